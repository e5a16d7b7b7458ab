"""Triton backward of the fused linear log-probs (``method="fused"``): recompute logits tiles, ``dz``, then
``dh``, ``dW``, ``db``, with no ``[C, V]`` workspace at all.

Per token, from the upstream grads ``g_l`` (on logprob) and ``g_H`` (on entropy), docs/MATH.md §6::

    log p = z - lse,   dz = g_l * (onehot(y) - p) - g_H * p * (log p + entropy)
    dh = dz @ W / T,   dW = dz.T @ h / T,   db = sum_n dz / T

Two kernel sets, chosen by ``deterministic``:

- ``True`` (rows): ``backward_dh_kernel``, a program owns ``BLOCK_N`` token rows and walks the vocabulary,
  adding ``dz @ W[tile]`` into its own rows of the fp32 ``dh``; ``backward_dw_kernel``, a program owns
  ``BLOCK_V`` vocabulary rows and walks the tokens, adding ``dz.T @ h`` into its own rows of the fp32
  ``dW`` (in place) and summing ``dz`` into ``db``. No races, bitwise reproducible; logits recomputed twice.
- ``False`` (atomic): ``backward_atomic_kernel``, one program per tile, logits recomputed once,
  ``dh``/``dW``/``db`` by relaxed fp32 atomic adds (no memory barrier; bits vary from run to run).

The ``dz`` tile is multiplied by ``dz_scale`` and cast to the operand dtype before its ``tl.dot``
(accumulation is fp32): with fp16 operands the scale is a power of two that lifts ``dz`` out of fp16's
subnormal range (token-mean weights ``~1/N`` times ``p ~ 1/V``), undone on the fp32 results.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from rpg_kernels.ops.linear_logprobs_forward import fp32_bias, logits_tile, n_bucket
from rpg_kernels.ops.lm_head import HeadGrads, LMHead, UpstreamGrads, fp16_scale
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
    z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, out_scale, HAS_ENTROPY_GRAD: tl.constexpr
):
    """``dz * out_scale`` (``out_scale = dz_scale / T``) for a ``[BLOCK_N, BLOCK_V]`` logits tile ``z``;
    zero outside ``N`` x ``V``."""
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    if HAS_ENTROPY_GRAD:
        coef = g_l[:, None] + g_h[:, None] * (log_p + entropy[:, None])
    else:
        coef = g_l[:, None]
    dz = tl.where(offs_v[None, :] == target[:, None], g_l[:, None], 0.0) - p * coef
    valid = (offs_n < N)[:, None] & (offs_v < V)[None, :]
    return tl.where(valid, dz * out_scale, 0.0)


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
    n_bucket,
    inv_temperature,
    dz_scale,
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
    mask_n = mask_n & (target >= 0)  # ignored tokens (target -1) read no hidden state
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
            (offs_n < N) & (target >= 0),
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
            z,
            offs_n,
            offs_v,
            N,
            V,
            target,
            lse,
            g_l,
            g_h,
            entropy,
            inv_temperature * dz_scale,
            HAS_ENTROPY_GRAD,
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
    n_bucket,
    inv_temperature,
    dz_scale,
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
        mask_n = mask_n & (target >= 0)  # ignored tokens (target -1) read no hidden state
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            (offs_n < N) & (target >= 0),
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
            z,
            offs_n,
            offs_v,
            N,
            V,
            target,
            lse,
            g_l,
            g_h,
            entropy,
            inv_temperature * dz_scale,
            HAS_ENTROPY_GRAD,
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
    n_bucket,
    inv_temperature,
    dz_scale,
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
    mask_n = mask_n & (target >= 0)  # ignored tokens (target -1) read no hidden state
    z = logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        offs_n,
        offs_v,
        (offs_n < N) & (target >= 0),
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
        z, offs_n, offs_v, N, V, target, lse, g_l, g_h, entropy, inv_temperature * dz_scale, HAS_ENTROPY_GRAD
    )
    tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
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
            dh_ptr + rows_dh[:, None] + offs_h[None, :],
            tl.dot(dz, w, input_precision="ieee"),
            mask=h_mask,
            sem="relaxed",
        )
        tl.atomic_add(
            dw_ptr + rows_dw[:, None] + offs_h[None, :],
            tl.dot(dz_t, h, input_precision="ieee"),
            mask=w_mask,
            sem="relaxed",
        )


_VECTOR_TYPES = {
    "bias_ptr": "*fp32",
    "targets_ptr": "*i64",
    "lse_ptr": "*fp32",
    "entropy_ptr": "*fp32",
    "grad_logprob_ptr": "*fp32",
    "grad_entropy_ptr": "*fp32",
    "inv_temperature": "fp32",
    "dz_scale": "fp32",
}

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


def fp16_dz_scale(grads: UpstreamGrads, valid: torch.Tensor, vocab: int, temperature: float) -> float:
    """The fp16 scale from the bound ``|dz| <= (|g_l| + |g_H| (1 + log V)) / T`` (``p |log p + H| <= 1/e + H
    <= 1 + log V``) over the tokens with a target. One host sync."""
    bound = grads.logprob.float().abs()
    if grads.entropy is not None:
        bound = bound + grads.entropy.float().abs() * (1.0 + math.log(vocab))
    peak = float(torch.where(valid, bound, 0.0).amax()) / temperature if bound.numel() else 0.0
    return fp16_scale(peak)


def linear_logprobs_backward(
    head: LMHead,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grads: UpstreamGrads,
    need: tuple[bool, bool, bool] = (True, True, True),
    deterministic: bool = True,
    lap: Callable[[str], None] = lambda phase: None,
) -> HeadGrads:
    """``(dh [N, H], dW [V, H], db [V] | None)`` (None where not needed) from per-token upstream grads.

    ``lse``/``entropy`` from the forward; ``grads.entropy`` may be None. Ignored tokens get no gradient.
    Gradients come back in the input dtypes, or in fp32 for fp16 operands (``fp32_until_backward``).
    ``lap(phase)`` marks the end of each kernel launch (`rpg_kernels.ops.lm_head.HeadOptions.laps`).
    """
    hidden, weight, bias, targets = head.hidden, head.weight, head.bias, head.targets
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_hidden, need_weight, need_bias = need
    need_bias = need_bias and bias is not None
    valid = head.valid
    f32 = lambda x: torch.where(valid, x.to(torch.float32), 0.0).contiguous()  # noqa: E731
    has_entropy_grad = grads.entropy is not None
    lse32 = lse.to(torch.float32).contiguous()
    vectors = (
        fp32_bias(bias, weight),
        torch.where(valid, targets, -1),  # the kernels' mark of a token without a target
        lse32,
        entropy.to(torch.float32).contiguous() if has_entropy_grad else lse32,
        f32(grads.logprob),
        f32(grads.entropy) if has_entropy_grad else lse32,
    )
    fp16 = hidden.dtype == torch.float16
    scale = fp16_dz_scale(grads, valid, vocab, head.temperature) if fp16 else 1.0
    scalars = (n_bucket(n_tokens), 1.0 / head.temperature, scale)
    common = dict(device=device, dtype=hidden.dtype, HAS_ENTROPY_GRAD=has_entropy_grad)
    sizes = (n_tokens, vocab, hidden_size, hidden.stride(0), weight.stride(0))
    f32_zeros = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=device)  # noqa: E731

    need_dw = need_weight or need_bias or not deterministic  # the atomic kernel always produces all three
    dh = f32_zeros(n_tokens, hidden_size) if need_hidden or not deterministic else None
    dw = f32_zeros(vocab, hidden_size) if need_dw else None
    db = f32_zeros(vocab) if need_dw else None
    if not deterministic:
        grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
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
            *scalars,
            reset_to_zero=("dh_ptr", "dw_ptr", "db_ptr"),
            **common,
        )
        lap("backward_atomic")
    else:
        if dh is not None:
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]),)  # noqa: E731
            args = (*vectors, dh, *sizes, dh.stride(0), *scalars)
            launch(
                backward_dh_kernel,
                "backward_dh",
                grid,
                hidden,
                weight,
                *args,
                reset_to_zero=("dh_ptr",),
                **common,
            )
            lap("backward_dh")
        if dw is not None:
            grid = lambda meta: (triton.cdiv(vocab, meta["BLOCK_V"]),)  # noqa: E731
            args = (*vectors, dw, db, *sizes, dw.stride(0), *scalars)
            launch(
                backward_dw_kernel,
                "backward_dw",
                grid,
                hidden,
                weight,
                *args,
                reset_to_zero=("dw_ptr",),
                **common,
            )
            lap("backward_dw")
    if scale != 1.0:
        for g in (dh, dw, db):
            if g is not None:
                g.mul_(1.0 / scale)
    if fp16:  # kept in fp32 until backward, where GradScaler's factor applies before rounding
        kept = (dh if need_hidden else None, dw if need_weight else None, db if need_bias else None)
        return HeadGrads(*kept, fp32_until_backward=True)
    return HeadGrads(
        dh.to(hidden.dtype) if need_hidden else None,
        dw.to(weight.dtype) if need_weight else None,
        db.to(bias.dtype) if need_bias else None,
    )
