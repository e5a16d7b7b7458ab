"""Triton backward of the fused linear log-probs: recompute logits tiles, ``dz``, then ``dh``, ``dW``, ``db``.

Per token, from the upstream grads ``g_l`` (on logprob) and ``g_H`` (on entropy), docs/MATH.md §6::

    log p = z - lse,   dz = g_l * (onehot(y) - p) - g_H * p * (log p + entropy)
    dh = dz @ W / T,   dW = dz.T @ h / T,   db = sum_n dz / T

Three methods (``method=``); the first two are deterministic (no order-dependent atomics):

- ``"gemm"`` (default): per chunk of ``C`` tokens, ``backward_dz_kernel`` (one program per
  ``(BLOCK_N, BLOCK_V)`` tile, token blocks fastest so that running programs share ``W`` tiles in L2)
  writes ``dz / T`` in the operand dtype to a ``[C, V]`` workspace (``C * V`` bounded, independent of
  ``N``); then two cuBLAS GEMMs: ``dh[chunk] = dz @ W`` and ``dW += dz.T @ h[chunk]`` (fp32
  accumulator), ``db += sum(dz)`` (fp32). Logits are recomputed once and 2/3 of the FLOPs run in cuBLAS.
- ``"rows"``: two Triton kernels, no workspace at all:

  - ``backward_dh_kernel``: a program owns ``BLOCK_N`` token rows and walks the vocabulary; for each
    tile it adds ``dz @ W[tile]`` into its own rows of the fp32 ``dh`` (read-modify-write, no races).
  - ``backward_dw_kernel``: a program owns ``BLOCK_V`` vocabulary rows and walks the tokens; it adds
    ``dz.T @ h`` into its own rows of the fp32 ``dW`` and sums ``dz`` into ``db`` in registers.

  Logits are recomputed twice and the fp32 read-modify-writes cost memory traffic.
- ``"atomic"`` (``deterministic=False``): ``backward_atomic_kernel``, one program per tile, logits
  recomputed once, ``dh``/``dW``/``db`` by fp32 atomic adds (bits vary from run to run).
The ``dz`` tile is cast to the operand dtype (bf16/fp16) before its ``tl.dot``; accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpg_kernels.ops.linear_logprobs_forward import fp32_bias, logits_tile
from rpg_kernels.ops.tile_configs import launch


@triton.jit
def _token_vectors(
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    offs_n,
    N,
    HAS_ENTROPY_GRAD: tl.constexpr,
):
    """Per-token ``(target, lse, g_l, g_H, entropy)`` for rows ``offs_n`` (zeros past ``N``)."""
    mask_n = offs_n < N
    target = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    g_l = tl.load(grad_logprob_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_ENTROPY_GRAD:
        g_h = tl.load(grad_entropy_ptr + offs_n, mask=mask_n, other=0.0)
        entropy = tl.load(entropy_ptr + offs_n, mask=mask_n, other=0.0)
    else:
        g_h = g_l
        entropy = g_l
    return target, lse, g_l, g_h, entropy


@triton.jit
def _grad_logits(
    z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature, HAS_ENTROPY_GRAD: tl.constexpr
):
    """``dz / T`` for a ``[BLOCK_N, BLOCK_V]`` logits tile ``z``; zero outside ``N`` x ``V``."""
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if HAS_ENTROPY_GRAD:
        coef = g_l[:, None] + g_h[:, None] * (log_p + entropy[:, None])
    else:
        coef = g_l[:, None]
    dz = tl.where(offs_v[None, :] == target[:, None], g_l[:, None], 0.0) - p * coef
    valid = (offs_n < N)[:, None] & (offs_v < V)[None, :]
    return tl.where(valid, dz * inv_temperature, 0.0)


@triton.jit
def backward_dz_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    dz_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dzn,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dz[n, v] / T`` of one ``(BLOCK_N, BLOCK_V)`` tile, stored in ``dz_ptr``'s dtype (``[N, V]``)."""
    pid = tl.program_id(0)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    offs_n = (pid % num_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = (pid // num_n_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    target, lse, g_l, g_h, entropy = _token_vectors(
        targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, offs_n, N, HAS_ENTROPY_GRAD
    )
    z = logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        offs_v,
        N,
        V,
        H,
        stride_hn,
        stride_wv,
        inv_temperature,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    dz = _grad_logits(
        z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature, HAS_ENTROPY_GRAD
    )
    ptrs = dz_ptr + offs_n.to(tl.int64)[:, None] * stride_dzn + offs_v[None, :]
    tl.store(ptrs, dz.to(dz_ptr.dtype.element_ty), mask=(offs_n < N)[:, None] & (offs_v < V)[None, :])


@triton.jit
def backward_dh_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    dh_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dhn,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dh[rows] += dz @ W / T`` over the whole vocabulary; ``dh`` is fp32 ``[N, H]``, zero-initialised."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    target, lse, g_l, g_h, entropy = _token_vectors(
        targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, offs_n, N, HAS_ENTROPY_GRAD
    )
    rows_dh = offs_n.to(tl.int64) * stride_dhn
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            N,
            V,
            H,
            stride_hn,
            stride_wv,
            inv_temperature,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        dz = _grad_logits(
            z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature, HAS_ENTROPY_GRAD
        )
        dz = dz.to(weight_ptr.dtype.element_ty)
        rows_w = offs_v.to(tl.int64) * stride_wv
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            w_mask = mask_v[:, None] & mask_h[None, :]
            w = tl.load(weight_ptr + rows_w[:, None] + offs_h[None, :], mask=w_mask, other=0.0)
            dh_ptrs = dh_ptr + rows_dh[:, None] + offs_h[None, :]
            dh_mask = mask_n[:, None] & mask_h[None, :]
            dh = tl.dot(dz, w, tl.load(dh_ptrs, mask=dh_mask, other=0.0), input_precision="ieee")
            tl.store(dh_ptrs, dh, mask=dh_mask)


@triton.jit
def backward_dw_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dwv,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``dW[rows] += dz.T @ h / T`` and ``db[rows] = sum_n dz / T`` over all tokens (fp32, ``dW`` zeroed)."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    rows_dw = offs_v.to(tl.int64) * stride_dwv
    db = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        target, lse, g_l, g_h, entropy = _token_vectors(
            targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, offs_n, N, HAS_ENTROPY_GRAD
        )
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            N,
            V,
            H,
            stride_hn,
            stride_wv,
            inv_temperature,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        dz = _grad_logits(
            z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature, HAS_ENTROPY_GRAD
        )
        db += tl.sum(dz, axis=0)
        dz_t = tl.trans(dz.to(hidden_ptr.dtype.element_ty))
        rows_h = offs_n.to(tl.int64) * stride_hn
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask_h = offs_h < H
            h_mask = mask_n[:, None] & mask_h[None, :]
            h = tl.load(hidden_ptr + rows_h[:, None] + offs_h[None, :], mask=h_mask, other=0.0)
            dw_ptrs = dw_ptr + rows_dw[:, None] + offs_h[None, :]
            dw_mask = mask_v[:, None] & mask_h[None, :]
            dw = tl.dot(dz_t, h, tl.load(dw_ptrs, mask=dw_mask, other=0.0), input_precision="ieee")
            tl.store(dw_ptrs, dw, mask=dw_mask)
    tl.store(db_ptr + offs_v, db, mask=mask_v)


@triton.jit
def backward_atomic_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_dhn,
    stride_dwv,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One ``(BLOCK_N, BLOCK_V)`` tile: atomically add its share of ``dh``, ``dW``, ``db`` (fp32, zeroed)."""
    pid = tl.program_id(0)
    num_v_blocks = tl.cdiv(V, BLOCK_V)
    offs_n = (pid // num_v_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = (pid % num_v_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    target, lse, g_l, g_h, entropy = _token_vectors(
        targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, offs_n, N, HAS_ENTROPY_GRAD
    )
    z = logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        offs_v,
        N,
        V,
        H,
        stride_hn,
        stride_wv,
        inv_temperature,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    dz = _grad_logits(
        z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature, HAS_ENTROPY_GRAD
    )
    tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
    dz = dz.to(weight_ptr.dtype.element_ty)
    dz_t = tl.trans(dz)
    rows_h = offs_n.to(tl.int64) * stride_hn
    rows_w = offs_v.to(tl.int64) * stride_wv
    rows_dh = offs_n.to(tl.int64) * stride_dhn
    rows_dw = offs_v.to(tl.int64) * stride_dwv
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h_mask = mask_n[:, None] & mask_h[None, :]
        w_mask = mask_v[:, None] & mask_h[None, :]
        w = tl.load(weight_ptr + rows_w[:, None] + offs_h[None, :], mask=w_mask, other=0.0)
        h = tl.load(hidden_ptr + rows_h[:, None] + offs_h[None, :], mask=h_mask, other=0.0)
        tl.atomic_add(
            dh_ptr + rows_dh[:, None] + offs_h[None, :], tl.dot(dz, w, input_precision="ieee"), mask=h_mask
        )
        tl.atomic_add(
            dw_ptr + rows_dw[:, None] + offs_h[None, :], tl.dot(dz_t, h, input_precision="ieee"), mask=w_mask
        )


_VECTOR_TYPES = {
    "bias_ptr": "*fp32",
    "targets_ptr": "*i64",
    "lse_ptr": "*fp32",
    "entropy_ptr": "*fp32",
    "grad_logprob_ptr": "*fp32",
    "grad_entropy_ptr": "*fp32",
    "inv_temperature": "fp32",
}

_DW_TYPES = {"dw_ptr": "*fp32", "db_ptr": "*fp32"}


def aot_variants(dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")):
    """Yield ``(family, kernel, types, constexprs)`` for every variant this module launches (tiles aside)."""
    kernels = (
        ("backward_dz", backward_dz_kernel, {"dz_ptr": "*OPERAND"}),
        ("backward_dh", backward_dh_kernel, {"dh_ptr": "*fp32"}),
        ("backward_dw", backward_dw_kernel, _DW_TYPES),
        ("backward_atomic", backward_atomic_kernel, {"dh_ptr": "*fp32", **_DW_TYPES}),
    )
    for dtype in dtypes:
        for family, kernel, out_types in kernels:
            for has_entropy_grad in (False, True):
                types = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", **_VECTOR_TYPES, **out_types}
                types = {name: ty.replace("OPERAND", dtype) for name, ty in types.items()}
                yield family, kernel, types, {"HAS_ENTROPY_GRAD": has_entropy_grad}


METHODS = ("gemm", "rows", "atomic")
DEFAULT_DZ_ELEMENTS = 1 << 28  # "gemm" workspace: 512 MiB of bf16 dz, e.g. 1766 tokens x 151936


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``, ``b`` in the operand dtype (fp32 GEMM accumulation)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:
            acc += torch.mm(a, b, out_dtype=torch.float32)
            return
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    acc += torch.mm(a, b).to(torch.float32)


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    deterministic: bool = True,
    method: str | None = None,
    dz_elements: int = DEFAULT_DZ_ELEMENTS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dh [N, H], dW [V, H], db [V] | None)`` in the input dtypes (None where not needed).

    ``hidden [N, H]``, ``weight [V, H]`` (rows contiguous), ``targets [N]`` int64, ``lse``/``entropy``
    from the forward, ``grad_*`` per-token upstream grads ``[N]``; ``grad_entropy`` may be None.
    Ignored tokens (``targets == ignore_index``) get no gradient. ``method``: one of ``METHODS``
    (default ``"gemm"``, or ``"atomic"`` when ``deterministic=False``); ``dz_elements`` bounds the
    ``"gemm"`` workspace.
    """
    method = method or ("gemm" if deterministic else "atomic")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    valid = targets != ignore_index
    f32 = lambda x: torch.where(valid, x.to(torch.float32), 0.0).contiguous()
    has_entropy_grad = grad_entropy is not None
    bias32 = fp32_bias(bias, weight)
    lse32 = lse.to(torch.float32).contiguous()
    per_token = (
        targets,
        lse32,
        entropy.to(torch.float32).contiguous() if has_entropy_grad else lse32,
        f32(grad_logprob),
        f32(grad_entropy) if has_entropy_grad else lse32,
    )
    inv_t = 1.0 / temperature
    common = dict(device=device, dtype=hidden.dtype, HAS_ENTROPY_GRAD=has_entropy_grad)
    sizes = (n_tokens, vocab, hidden_size, hidden.stride(0), weight.stride(0))
    f32_zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)

    if method == "gemm":
        dh = torch.empty_like(hidden) if need_hidden else None
        dw = f32_zeros(vocab, hidden_size) if need_weight else None
        db = f32_zeros(vocab) if need_bias else None
        chunk = max(1, min(n_tokens, dz_elements // vocab))
        dz = torch.empty((chunk, vocab), dtype=hidden.dtype, device=device)
        for start in range(0, n_tokens, chunk):
            rows = slice(start, start + chunk)
            h = hidden[rows]
            n = h.shape[0]
            dz_rows = dz[:n]
            grid = lambda meta, n=n: (triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)
            launch(
                backward_dz_kernel,
                "backward_dz",
                grid,
                h,
                weight,
                bias32,
                *(t[rows] for t in per_token),
                dz_rows,
                n,
                *sizes[1:],
                dz_rows.stride(0),
                inv_t,
                **common,
            )
            if dh is not None:
                torch.mm(dz_rows, weight, out=dh[rows])
            if dw is not None:
                _add_matmul_fp32(dw, dz_rows.T, h)
            if db is not None:
                db += dz_rows.sum(dim=0, dtype=torch.float32)
        return (
            dh,
            dw.to(weight.dtype) if dw is not None else None,
            db.to(bias.dtype) if db is not None else None,
        )

    vectors = (bias32, *per_token)
    atomic = method == "atomic"
    need_dw = need_weight or need_bias or atomic  # the atomic kernel always produces all three
    dh = f32_zeros(n_tokens, hidden_size) if need_hidden or atomic else None
    dw = f32_zeros(vocab, hidden_size) if need_dw else None
    db = f32_zeros(vocab) if need_dw else None
    if atomic:
        grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)
        launch(
            backward_atomic_kernel,
            "backward_atomic",
            grid,
            hidden,
            weight,
            *vectors,
            dh,
            dw,
            db,
            *sizes,
            dh.stride(0),
            dw.stride(0),
            inv_t,
            reset_to_zero=("dh_ptr", "dw_ptr", "db_ptr"),
            **common,
        )
    else:
        if dh is not None:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]),)
            launch(
                backward_dh_kernel,
                "backward_dh",
                grid,
                hidden,
                weight,
                *vectors,
                dh,
                *sizes,
                dh.stride(0),
                inv_t,
                reset_to_zero=("dh_ptr",),
                **common,
            )
        if dw is not None:
            grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)
            launch(
                backward_dw_kernel,
                "backward_dw",
                grid,
                hidden,
                weight,
                *vectors,
                dw,
                db,
                *sizes,
                dw.stride(0),
                inv_t,
                reset_to_zero=("dw_ptr",),
                **common,
            )
    return (
        dh.to(hidden.dtype) if need_hidden else None,
        dw.to(weight.dtype) if need_weight else None,
        db.to(bias.dtype) if need_bias else None,
    )
