"""Triton backward of the fused linear log-probs: recompute logits tiles, ``dz``, then ``dh``, ``dW``, ``db``.

Per token, from the upstream grads ``g_l`` (on logprob) and ``g_H`` (on entropy), SPEC §6::

    log p = z - lse,   dz = g_l * (onehot(y) - p) - g_H * p * (log p + entropy)
    dh = dz @ W / T,   dW = dz.T @ h / T,   db = sum_n dz / T

Deterministic by default (no order-dependent atomics), in two kernels:

- ``backward_dh_kernel``: a program owns ``BLOCK_N`` token rows and walks the vocabulary; for each
  tile it adds ``dz @ W[tile]`` into its own rows of the fp32 ``dh`` (read-modify-write, no races).
- ``backward_dw_kernel``: a program owns ``BLOCK_V`` vocabulary rows and walks the tokens; it adds
  ``dz.T @ h`` into its own rows of the fp32 ``dW`` and sums ``dz`` into ``db`` in registers.

``deterministic=False`` uses ``backward_atomic_kernel`` instead: one program per ``(BLOCK_N, BLOCK_V)``
tile, logits recomputed once, ``dh``/``dW``/``db`` by fp32 atomic adds (faster; bits vary run to run).
The ``dz`` tile is cast to the operand dtype (bf16/fp16) before its ``tl.dot``; accumulation is fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpg_kernels.ops.linear_logprobs_forward import fp32_bias, logits_tile
from rpg_kernels.ops.tile_configs import launch


@triton.jit
def _token_vectors(targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr, offs_n, N,
                   HAS_ENTROPY_GRAD: tl.constexpr):
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
def _grad_logits(z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature,
                 HAS_ENTROPY_GRAD: tl.constexpr):
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
def backward_dh_kernel(
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr,
    dh_ptr,
    N, V, H, stride_hn, stride_wv, stride_dhn,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
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
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv,
                        inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _grad_logits(z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature,
                          HAS_ENTROPY_GRAD)
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
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr,
    dw_ptr, db_ptr,
    N, V, H, stride_hn, stride_wv, stride_dwv,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
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
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv,
                        inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H)
        dz = _grad_logits(z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature,
                          HAS_ENTROPY_GRAD)
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
    hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logprob_ptr, grad_entropy_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, H, stride_hn, stride_wv, stride_dhn, stride_dwv,
    inv_temperature,
    HAS_ENTROPY_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
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
    z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, N, V, H, stride_hn, stride_wv,
                    inv_temperature, BLOCK_N, BLOCK_V, BLOCK_H)
    dz = _grad_logits(z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature,
                      HAS_ENTROPY_GRAD)
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
        tl.atomic_add(dh_ptr + rows_dh[:, None] + offs_h[None, :], tl.dot(dz, w, input_precision="ieee"),
                      mask=h_mask)
        tl.atomic_add(dw_ptr + rows_dw[:, None] + offs_h[None, :], tl.dot(dz_t, h, input_precision="ieee"),
                      mask=w_mask)


_VECTOR_TYPES = {"bias_ptr": "*fp32", "targets_ptr": "*i64", "lse_ptr": "*fp32", "entropy_ptr": "*fp32",
                 "grad_logprob_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "inv_temperature": "fp32"}

_DW_TYPES = {"dw_ptr": "*fp32", "db_ptr": "*fp32"}


def aot_variants(dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")):
    """Yield ``(family, kernel, types, constexprs)`` for every variant this module launches (tiles aside)."""
    kernels = (
        ("backward_dh", backward_dh_kernel, {"dh_ptr": "*fp32"}),
        ("backward_dw", backward_dw_kernel, _DW_TYPES),
        ("backward_atomic", backward_atomic_kernel, {"dh_ptr": "*fp32", **_DW_TYPES}),
    )
    for dtype in dtypes:
        for family, kernel, out_types in kernels:
            for has_entropy_grad in (False, True):
                types = {"hidden_ptr": f"*{dtype}", "weight_ptr": f"*{dtype}", **_VECTOR_TYPES, **out_types}
                yield family, kernel, types, {"HAS_ENTROPY_GRAD": has_entropy_grad}


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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dh [N, H], dW [V, H], db [V] | None)`` in the input dtypes (None where not needed).

    ``hidden [N, H]``, ``weight [V, H]`` (rows contiguous), ``targets [N]`` int64, ``lse``/``entropy``
    from the forward, ``grad_*`` per-token upstream grads ``[N]``; ``grad_entropy`` may be None.
    Ignored tokens (``targets == ignore_index``) get no gradient.
    """
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    valid = targets != ignore_index
    f32 = lambda x: torch.where(valid, x.to(torch.float32), 0.0).contiguous()
    has_entropy_grad = grad_entropy is not None
    vectors = (
        fp32_bias(bias, weight),
        targets,
        lse.to(torch.float32).contiguous(),
        entropy.to(torch.float32).contiguous() if has_entropy_grad else lse,
        f32(grad_logprob),
        f32(grad_entropy) if has_entropy_grad else lse,
    )
    inv_t = 1.0 / temperature
    common = dict(device=device, dtype=hidden.dtype, HAS_ENTROPY_GRAD=has_entropy_grad)
    # fp32 accumulators; the atomic kernel always produces all three.
    need_dw = need_weight or need_bias or not deterministic
    dh = torch.zeros((n_tokens, hidden_size), dtype=torch.float32, device=device)
    dh = dh if need_hidden or not deterministic else None
    dw = torch.zeros((vocab, hidden_size), dtype=torch.float32, device=device) if need_dw else None
    db = torch.zeros(vocab, dtype=torch.float32, device=device) if need_dw else None
    sizes = (n_tokens, vocab, hidden_size, hidden.stride(0), weight.stride(0))

    if not deterministic:
        grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)
        launch(backward_atomic_kernel, "backward_atomic", grid, hidden, weight, *vectors, dh, dw, db,
               *sizes, dh.stride(0), dw.stride(0), inv_t, reset_to_zero=("dh_ptr", "dw_ptr", "db_ptr"),
               **common)
    else:
        if dh is not None:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]),)
            launch(backward_dh_kernel, "backward_dh", grid, hidden, weight, *vectors, dh,
                   *sizes, dh.stride(0), inv_t, reset_to_zero=("dh_ptr",), **common)
        if dw is not None:
            grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)
            launch(backward_dw_kernel, "backward_dw", grid, hidden, weight, *vectors, dw, db,
                   *sizes, dw.stride(0), inv_t, reset_to_zero=("dw_ptr",), **common)
    return (
        dh.to(hidden.dtype) if need_hidden else None,
        dw.to(weight.dtype) if need_weight else None,
        db.to(bias.dtype) if need_bias else None,
    )
