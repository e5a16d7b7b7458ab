"""Triton row kernel of the single pass: one fp32 logits row in, its statistics, loss and ``dz`` out.

The single pass (`rpg_kernels.ops.single_pass`) computes a token chunk's logits ``h_c @ W.T`` with
cuBLAS into an fp32 ``[C, V]`` buffer; this kernel then walks each row (one program per token) twice
(docs/MATH.md §6), with ``z = (row + b) / T``:

1. ``m = max z``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) (z - m)``: ``lse = m + log s``,
   ``logprob = z[y] - lse``, ``entropy = log s - t / s``;
2. ``p = exp(z - lse)``, ``dz = (g_l (onehot(y) - p) - g_H p (log p + entropy)) / T``, stored in
   ``dz_ptr``'s dtype (the operand dtype for the two gradient GEMMs; it may alias the fp32 row).

Modes (``MODE``, a constexpr):

- `MODE_STATS`: pass 1 only (no-grad log-probs; the first pass of ``gspo`` and of the log-prob backward).
- `MODE_GRADS`: pass 2 only, from given ``lse``, ``entropy``, ``g_l``, ``g_H``.
- `MODE_LOSS`: pass 1, the per-token loss of docs/MATH.md §3 (`token_loss`, the epilogue's math) giving
  ``g_l = weight * dL/dl`` and ``g_H = -entropy_coef * weight``, then pass 2.

Every row handed to the kernel is a real token (the orchestrator gathers masked-in rows first), so no
row is skipped. Statistics are fp32; the loss math runs in ``COMPUTE`` (fp32, or fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpg_kernels.config import LossConfig
from rpg_kernels.ops.token_loss_epilogue import kernel_constexprs, kernel_params, load_params, token_loss

MODE_STATS, MODE_GRADS, MODE_LOSS = 0, 1, 2
MODES = (MODE_STATS, MODE_GRADS, MODE_LOSS)
BLOCK_V = 2048  # 8 warps x 32 threads x 8 fp32: two 16-byte loads per thread and block
NUM_WARPS = 8
INTERPRETER_BLOCK_V = 64  # small blocks under the interpreter, so that partial blocks are exercised

_NEG_BIG = tl.constexpr(-1.0e30)  # a finite start for the running max: m_old - m_new is never inf - inf


@triton.jit
def logit_rows_kernel(
    z_ptr,
    dz_ptr,
    bias_ptr,
    targets_ptr,
    logprob_ptr,
    entropy_ptr,
    lse_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    weight_ptr,
    rollout_weight_ptr,
    params_ptr,
    loss_ptr,
    kl_ptr,
    ratio_ptr,
    zone_ptr,
    V,
    stride_z,
    stride_dz,
    inv_temperature,
    entropy_coef,
    MODE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ENTROPY_GRAD: tl.constexpr,
    HAS_ROLLOUT_WEIGHT: tl.constexpr,
    ALGO: tl.constexpr,
    KL: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Row ``program_id(0)`` of the chunk: see the module docstring for what each ``MODE`` reads and writes.

    Per-token pointers are offset to the chunk's first row by the launcher; ``ref_ptr`` is ``old_ptr``
    when there is no reference; unused pointers may be any tensor.
    """
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    dz_row = dz_ptr + row * stride_dz
    target = tl.load(targets_ptr + row)
    offs = tl.arange(0, BLOCK_V)

    target_logit = tl.load(z_row + target)
    if HAS_BIAS:
        target_logit += tl.load(bias_ptr + target)
    target_logit = target_logit * inv_temperature

    if MODE == 1:  # MODE_GRADS: the statistics and the per-token grads are given
        lse = tl.load(lse_ptr + row)
        g_l = tl.load(grad_logprob_ptr + row)
        if HAS_ENTROPY_GRAD:
            g_h = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        else:
            g_h = 0.0
            entropy = 0.0
    else:
        run_max = tl.full((BLOCK_V,), _NEG_BIG, dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        run_tsum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):  # per-lane online statistics, combined across lanes below
            cols = v0 + offs
            in_row = cols < V
            z = tl.load(z_row + cols, mask=in_row, other=0.0)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
            z = tl.where(in_row, z * inv_temperature, _NEG_BIG)
            new_max = tl.maximum(run_max, z)
            alpha = tl.exp(run_max - new_max)
            e = tl.exp(z - new_max)
            run_tsum = alpha * (run_tsum + (run_max - new_max) * run_sum) + e * (z - new_max)
            run_sum = run_sum * alpha + e
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        scale = tl.exp(run_max - row_max)  # lanes that saw only padding: exp(-1e30 - m) = 0
        sum_exp = tl.sum(run_sum * scale, axis=0)
        tsum = tl.sum(scale * (run_tsum + (run_max - row_max) * run_sum), axis=0)
        log_sum = tl.log(sum_exp)
        lse = row_max + log_sum
        entropy = log_sum - tsum / sum_exp
        logprob = target_logit - lse
        tl.store(logprob_ptr + row, logprob)
        tl.store(entropy_ptr + row, entropy)
        tl.store(lse_ptr + row, lse)

        if MODE == 2:  # MODE_LOSS: the per-token loss and its gradient, as the epilogue computes them
            beta, low_bound, high_bound, clip_c, kl_clamp = load_params(params_ptr)
            old = tl.load(old_ptr + row).to(COMPUTE)
            ref = tl.load(ref_ptr + row).to(COMPUTE)
            adv = tl.load(adv_ptr + row).to(COMPUTE)
            weight = tl.load(weight_ptr + row).to(COMPUTE)
            if HAS_ROLLOUT_WEIGHT:
                rollout_weight = tl.load(rollout_weight_ptr + row).to(COMPUTE)
            else:
                rollout_weight = 1.0
            loss, grad, zone, kl, w = token_loss(
                logprob.to(COMPUTE),
                old,
                ref,
                adv,
                rollout_weight,
                beta,
                low_bound,
                high_bound,
                clip_c,
                kl_clamp,
                ALGO,
                KL,
                CLIP_MODE,
            )
            tl.store(loss_ptr + row, loss)
            tl.store(kl_ptr + row, kl)
            tl.store(ratio_ptr + row, w)
            tl.store(zone_ptr + row, zone.to(tl.int8))
            g_l = (grad * weight).to(tl.float32)
            if HAS_ENTROPY_GRAD:
                g_h = (-entropy_coef * weight).to(tl.float32)
            else:
                g_h = 0.0

    if MODE != 0:  # pass 2: dz = (g_l (onehot - p) - g_H p (log p + H)) / T
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            in_row = cols < V
            z = tl.load(z_row + cols, mask=in_row, other=0.0)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=in_row, other=0.0)
            log_p = z * inv_temperature - lse
            p = tl.exp(log_p)
            if HAS_ENTROPY_GRAD:
                coef = g_l + g_h * (log_p + entropy)
            else:
                coef = g_l
            dz = tl.where(cols == target, g_l, 0.0) - p * coef
            tl.store(dz_row + cols, (dz * inv_temperature).to(dz_ptr.dtype.element_ty), mask=in_row)


def aot_variants(dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")):
    """Yield ``(family, kernel, types, constexprs)`` for every variant the single pass launches.

    Every mode x flag x ``dz`` dtype; the loss math (ALGO x KL x CLIP_MODE) for one representative per algo
    family, in fp32 and fp64 (fp64 per-token inputs); the epilogue's `aot_variants` covers every
    combination of the same `token_loss` function.
    """
    losses = [LossConfig.preset(name) for name in ("rpg_reinforce", "rpg", "grpo", "cispo")]
    for dtype in dtypes:
        for mode in MODES:
            for has_bias in (False, True):
                for has_entropy_grad in (False, True) if mode != MODE_STATS else (False,):
                    for config in losses if mode == MODE_LOSS else losses[:1]:
                        for has_rollout_weight in (False, True) if mode == MODE_LOSS else (False,):
                            computes = (
                                (torch.float32, torch.float64) if mode == MODE_LOSS else (torch.float32,)
                            )
                            for compute in computes:
                                if compute == torch.float64 and (has_bias or dtype != "fp32"):
                                    continue  # fp64 loss math: once per algo and flag set is enough
                                constexprs = dict(
                                    MODE=mode,
                                    HAS_BIAS=has_bias,
                                    HAS_ENTROPY_GRAD=has_entropy_grad,
                                    HAS_ROLLOUT_WEIGHT=has_rollout_weight,
                                    **kernel_constexprs(config, compute),
                                    BLOCK_V=BLOCK_V,
                                )
                                yield "logit_rows", logit_rows_kernel, _types(dtype, compute), constexprs


def _types(dz_dtype: str, compute: torch.dtype = torch.float32) -> dict[str, str]:
    """Argument types: fp32 logits and statistics, ``dz`` in the operand dtype, loss vectors in ``compute``
    (fp32 or fp64)."""
    loss_type = "*fp64" if compute == torch.float64 else "*fp32"
    stats = (
        "logprob_ptr",
        "entropy_ptr",
        "lse_ptr",
        "grad_logprob_ptr",
        "grad_entropy_ptr",
        "bias_ptr",
        "z_ptr",
    )
    loss = ("old_ptr", "ref_ptr", "adv_ptr", "weight_ptr", "rollout_weight_ptr", "params_ptr", "loss_ptr")
    loss += ("kl_ptr", "ratio_ptr")
    types = {name: "*fp32" for name in stats}
    types.update({name: loss_type for name in loss})
    types.update(
        dz_ptr=f"*{dz_dtype}",
        targets_ptr="*i64",
        zone_ptr="*i8",
        inv_temperature="fp32",
        entropy_coef="fp32",
        stride_z="i64",
        stride_dz="i64",
    )
    return types


def launch_logit_rows(
    mode: int,
    z: torch.Tensor,
    dz: torch.Tensor | None,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    stats: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    grads: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    loss: dict | None = None,
) -> None:
    """Run the kernel over the ``C`` rows of the fp32 chunk ``z [C, V]`` (row stride ``z.stride(0)``).

    ``stats``: ``(logprob, entropy, lse)`` ``[C]`` fp32 (written, or read in `MODE_GRADS`); ``dz``:
    ``[C, V]`` output in the operand dtype (may be ``z`` itself); ``grads``: ``(g_l, g_H | None)`` for
    `MODE_GRADS`; ``loss``: for `MODE_LOSS`, the chunk's per-token inputs ``old``, ``ref`` (or None),
    ``adv``, ``weight``, ``rollout_weight`` (or None) in the compute dtype, the outputs ``loss``, ``kl``,
    ``ratio`` (compute dtype) and ``zone`` (int8), ``config`` and ``entropy_coef``.
    """
    from rpg_kernels.ops.dispatch import triton_interpreter_enabled

    rows, vocab = z.shape
    if rows == 0:
        return
    logprob, entropy, lse = stats
    g_l, g_h = grads if grads is not None else (lse, None)
    spare = lse  # a valid pointer for arguments the mode does not read
    dz = z if dz is None else dz
    if loss is not None:
        config, compute = loss["config"], loss["old"].dtype
        params = kernel_params(config, compute, z.device)
        old, adv, weight = loss["old"], loss["adv"], loss["weight"]
        ref = loss["ref"] if loss["ref"] is not None else old
        rollout_weight = loss["rollout_weight"]
        outputs = (loss["loss"], loss["kl"], loss["ratio"], loss["zone"])
        constexprs = kernel_constexprs(config, compute)
        entropy_coef = float(loss["entropy_coef"])
        has_entropy_grad = entropy_coef != 0.0
    else:
        params = old = ref = adv = weight = rollout_weight = spare
        outputs = (spare, spare, spare, torch.empty(1, dtype=torch.int8, device=z.device))
        constexprs = kernel_constexprs(LossConfig(), torch.float32)
        entropy_coef = 0.0
        has_entropy_grad = g_h is not None
    block = INTERPRETER_BLOCK_V if triton_interpreter_enabled() else BLOCK_V
    logit_rows_kernel[(rows,)](
        z,
        dz,
        bias if bias is not None else spare,
        targets,
        logprob,
        entropy,
        lse,
        g_l,
        g_h if g_h is not None else spare,
        old,
        ref,
        adv,
        weight,
        rollout_weight if rollout_weight is not None else spare,
        params,
        *outputs,
        vocab,
        z.stride(0),
        dz.stride(0),
        1.0 / temperature,
        entropy_coef,
        MODE=mode,
        HAS_BIAS=bias is not None,
        HAS_ENTROPY_GRAD=has_entropy_grad,
        HAS_ROLLOUT_WEIGHT=rollout_weight is not None,
        **constexprs,
        BLOCK_V=block,
        num_warps=NUM_WARPS,
    )
