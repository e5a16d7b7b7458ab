"""`rpg_loss` on log-probs you already have: validate → per-token losses → aggregate → metrics.

Dtype policy: the loss is computed in float64 when any float input is float64, else in float32
(fp16/bf16 inputs are upcast); the returned loss has that compute dtype, and gradients reach
``logprobs`` (and ``entropy``) in their own dtype through autograd. Metrics are detached 0-d
float32 tensors (no host sync).

Masked-out tokens may hold anything (NaN, inf): every per-token input is replaced by 0 there
with ``torch.where`` before any ``exp``/``log``, and their aggregation weight is 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_kernels.checks import (
    check_finite_masked_all,
    check_float_dtype,
    check_num_items,
    check_same_device,
    check_same_shape,
    check_tensor,
)
from rpg_kernels.config import LossConfig, resolve_loss_config
from rpg_kernels.loss.aggregation import aggregate, aggregation_weights
from rpg_kernels.loss.token_losses import TokenLosses, token_losses

__all__ = [
    "rpg_loss",
    "loss_and_logprob_grads",
    "LossInputs",
    "prepare_loss_inputs",
    "validate_loss_inputs",
    "loss_metrics",
    "aggregation_weights",
    "aggregate",
    "token_losses",
    "TokenLosses",
]

BACKENDS = ("torch", "triton", "auto")


@dataclass
class LossInputs:
    """Validated per-token inputs as ``[B, T]`` views (``advantages``: ``[B, 1]`` or ``[B, T]``).

    From `validate_loss_inputs` they keep their dtypes and masked-out garbage; from
    `prepare_loss_inputs` they are in ``dtype`` (the compute dtype), expanded, zeros where ``~mask``.
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor  # bool
    ref_logprobs: Tensor | None
    entropy: Tensor | None
    dtype: torch.dtype  # fp64 when any float input is fp64, else fp32


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def validate_loss_inputs(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> LossInputs:
    """Check the docs/MATH.md §7 conditions and view every input as ``[B, T]`` (no copies, no casts).

    ``logprobs [B, T]`` or flat ``[N]`` (one sequence ``[1, N]``); ``old_logprobs``, ``ref_logprobs``,
    ``mask``, ``entropy`` of the same shape; ``advantages`` ``[B]``, ``[B, 1]`` or ``[B, T]``
    (flat: ``[N]`` per token or ``[1]``).
    """
    check_tensor("logprobs", logprobs)
    check_tensor("mask", mask)
    for name, t in (
        ("logprobs", logprobs),
        ("old_logprobs", old_logprobs),
        ("advantages", advantages),
        ("ref_logprobs", ref_logprobs),
        ("entropy", entropy),
    ):
        check_float_dtype(name, t)
    check_same_device(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        mask=mask,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
    )
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must be [B, T] or [N], got shape {tuple(logprobs.shape)}")
    check_same_shape(
        "logprobs", logprobs, old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs, entropy=entropy
    )

    flat = logprobs.dim() == 1
    batch, length = (1, logprobs.shape[0]) if flat else tuple(logprobs.shape)
    if flat and tuple(advantages.shape) in ((length,), (1,)):
        advantages = advantages.reshape(1, -1)
    elif not flat and tuple(advantages.shape) in ((batch,), (batch, 1)):
        advantages = advantages.reshape(batch, 1)
    elif flat or tuple(advantages.shape) != (batch, length):
        expected = f"[{length}] or [1]" if flat else f"[{batch}], [{batch}, 1] or [{batch}, {length}]"
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected {expected}")

    def to_2d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(batch, length)

    logprobs, old_logprobs, mask, ref_logprobs, entropy = map(
        to_2d, (logprobs, old_logprobs, mask, ref_logprobs, entropy)
    )
    keep = mask != 0
    check_finite_masked_all(keep, old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs)

    dtype = _compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs, entropy)
    return LossInputs(logprobs, old_logprobs, advantages, keep, ref_logprobs, entropy, dtype)


def _clean(t: Tensor | None, keep: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``, expanded to ``keep``'s shape, 0 where ``~keep`` (before any exp/log)."""
    if t is None:
        return None
    t = t.to(dtype).expand(keep.shape)
    return torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))


def prepare_loss_inputs(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> LossInputs:
    """`validate_loss_inputs`, then every tensor in the compute dtype, ``[B, T]``, zeros where masked out."""
    raw = validate_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    keep, dtype = raw.mask, raw.dtype
    tensors = (raw.logprobs, raw.old_logprobs, raw.advantages)
    return LossInputs(
        *(_clean(t, keep, dtype) for t in tensors),
        keep,
        _clean(raw.ref_logprobs, keep, dtype),
        _clean(raw.entropy, keep, dtype),
        dtype,
    )


@torch.no_grad()
def loss_metrics(
    mask: Tensor,
    kl: Tensor,
    ratio: Tensor,
    clip_low: Tensor,
    clip_high: Tensor,
    clip_dual: Tensor,
    entropy: Tensor | None = None,
) -> dict[str, Tensor]:
    """Masked means over this batch's tokens (detached 0-d fp32 tensors); zeros for an empty mask."""
    m = mask.to(torch.float32)
    inv_count = 1.0 / m.sum().clamp(min=1.0)

    def mean(t: Tensor) -> Tensor:
        return (t.to(torch.float32) * m).sum() * inv_count

    metrics = {
        "kl": mean(kl),
        "clip_frac": mean(clip_low | clip_high | clip_dual),
        "clip_frac_low": mean(clip_low),
        "clip_frac_high": mean(clip_high),
        "clip_frac_dual": mean(clip_dual),
        "ratio_mean": mean(ratio),
        "ratio_max": torch.where(mask, ratio.to(torch.float32), 0.0).amax() if mask.numel() else m.sum(),
        "num_tokens": m.sum(),
    }
    if entropy is not None:
        metrics["entropy"] = mean(entropy)
    return metrics


def rpg_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    num_items: float | int | Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The RPG-family loss of docs/MATH.md §2-4 on per-token log-probs.

    Args:
        logprobs: ``[B, T]`` or ``[N]``, log pi_theta of the sampled tokens (the differentiable input).
        old_logprobs: like ``logprobs``, the sampler's log-probs.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``; flat inputs take ``[N]`` or ``[1]``.
        mask: like ``logprobs``; non-zero = the token counts.
        ref_logprobs: like ``logprobs``; ``None`` means the reference is the sampler (``kappa = 1``).
        config: `LossConfig` (default: the ``rpg`` preset).
        num_items: global normaliser in the aggregation's unit (see `rpg_kernels.loss.aggregation`).
        entropy: optional per-token entropy like ``logprobs`` (differentiable); adds
            ``-entropy_coef * sum(entropy * weights)`` to the loss.

    Returns:
        ``(loss, metrics)``: ``loss = sum(L * weights) - entropy_coef * sum(entropy * weights)``, a 0-d
        tensor in the compute dtype; ``metrics`` (see `loss_metrics`) with kl, clip_frac(_low/_high/_dual),
        ratio_mean, ratio_max, num_tokens, entropy (when given).
    """
    config = resolve_loss_config(config)
    check_num_items(num_items)
    inputs = prepare_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    per_token = token_losses(
        inputs.logprobs, inputs.old_logprobs, inputs.advantages, inputs.mask, inputs.ref_logprobs, config
    )
    weights = aggregation_weights(inputs.mask, config.agg, num_items, dtype=inputs.logprobs.dtype)
    loss = (per_token.loss * weights).sum()
    if inputs.entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * (inputs.entropy * weights).sum()
    metrics = loss_metrics(
        inputs.mask,
        per_token.kl,
        per_token.ratio,
        per_token.clip_low,
        per_token.clip_high,
        per_token.clip_dual,
        inputs.entropy,
    )
    return loss, metrics


def loss_and_logprob_grads(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    num_items: float | int | Tensor | None = None,
    *,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    backend: str = "torch",
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    """`rpg_loss`'s value and its gradients w.r.t. ``logprobs`` and ``entropy`` (for the fused kernels).

    Returns ``(loss, grad_logprobs, grad_entropy, metrics)``: ``loss`` detached 0-d (compute dtype);
    ``grad_logprobs`` shaped and typed like ``logprobs``; ``grad_entropy`` like ``entropy`` or ``None``.
    Inputs need not require grad. ``backend``: ``"torch"`` (autograd through `rpg_loss`), ``"triton"``
    (the per-token epilogue kernel `rpg_kernels.ops.token_loss_epilogue` for every algo but ``gspo``,
    which stays on autograd), or ``"auto"`` (`rpg_kernels.ops.dispatch.resolve_backend`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; valid: {', '.join(BACKENDS)}")
    check_float_dtype("logprobs", logprobs)
    check_float_dtype("entropy", entropy)
    config = resolve_loss_config(config)
    if backend != "torch":
        from rpg_kernels.ops.dispatch import resolve_backend

        backend = resolve_backend(backend, logprobs.device)
    if backend == "triton" and config.algo != "gspo":
        return _epilogue_loss_and_grads(
            logprobs, old_logprobs, advantages, mask, ref_logprobs, config, num_items, entropy, entropy_coef
        )

    leaf_logprobs = logprobs.detach().requires_grad_(True)
    leaf_entropy = None
    if entropy is not None:
        leaf_entropy = entropy.detach().requires_grad_(True)
    with torch.enable_grad():
        loss, metrics = rpg_loss(
            leaf_logprobs,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs,
            config,
            num_items,
            entropy=leaf_entropy,
            entropy_coef=entropy_coef,
        )
        leaves = [leaf_logprobs] + ([leaf_entropy] if leaf_entropy is not None else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    grad_entropy = grads[1] if leaf_entropy is not None else None
    return loss.detach(), grads[0], grad_entropy, metrics


def _epilogue_loss_and_grads(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    config: LossConfig,
    num_items: float | int | Tensor | None,
    entropy: Tensor | None,
    entropy_coef: float,
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    """The ``backend="triton"`` path: per-token L and weight * dL/dl from the Triton epilogue kernel."""
    from rpg_kernels.ops.token_loss_epilogue import ZONE_DUAL, ZONE_HIGH, ZONE_LOW, token_loss_epilogue

    check_num_items(num_items)
    raw = validate_loss_inputs(logprobs, old_logprobs, advantages, mask, ref_logprobs, entropy)
    weights = aggregation_weights(raw.mask, config.agg, num_items, dtype=raw.dtype)
    out = token_loss_epilogue(
        raw.logprobs, raw.old_logprobs, raw.advantages, raw.mask, weights, config, raw.ref_logprobs
    )
    loss = (out.loss * weights).sum()
    grad_entropy = clean_entropy = None
    if entropy is not None:
        clean_entropy = _clean(raw.entropy, raw.mask, raw.dtype)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * (clean_entropy * weights).sum()
        grad_entropy = (-entropy_coef * weights).to(entropy.dtype).reshape(entropy.shape)
    zone = out.zone
    metrics = loss_metrics(
        raw.mask, out.kl, out.ratio, zone == ZONE_LOW, zone == ZONE_HIGH, zone == ZONE_DUAL, clean_entropy
    )
    return loss, out.grad.to(logprobs.dtype).reshape(logprobs.shape), grad_entropy, metrics
