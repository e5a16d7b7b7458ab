"""`rpg_loss` on log-probs you already have: validate → per-token losses → aggregate → metrics.

Dtype policy: the loss is computed in float64 when any float input is float64, else in float32
(fp16/bf16 inputs are upcast); the returned loss has that compute dtype, and gradients reach
``logprobs`` (and ``entropy``) in their own dtype through autograd. Metrics are detached 0-d
float32 tensors (no host sync).

Masked-out tokens may hold anything (NaN, inf): every per-token input is replaced by 0 there
with ``torch.where`` before any ``exp``/``log``, and their aggregation weight is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpg_kernels.checks import check_float_dtype
from rpg_kernels.config import LossConfig, resolve_loss_config
from rpg_kernels.loss.aggregation import aggregate, aggregation_weights
from rpg_kernels.loss.inputs import LossInputs, compute_dtype, prepare_loss_inputs, validate_loss_inputs
from rpg_kernels.loss.rollout_correction import rollout_mismatch_metrics, rollout_weights
from rpg_kernels.loss.token_losses import TokenLosses, token_losses

__all__ = [
    "rpg_loss",
    "per_token_loss",
    "loss_and_logprob_grads",
    "LossInputs",
    "prepare_loss_inputs",
    "validate_loss_inputs",
    "compute_dtype",
    "loss_metrics",
    "aggregation_weights",
    "aggregate",
    "token_losses",
    "TokenLosses",
    "rollout_weights",
    "rollout_mismatch_metrics",
]


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


def _per_token(inputs: LossInputs, config: LossConfig) -> TokenLosses:
    """`token_losses` of prepared inputs."""
    return token_losses(
        inputs.logprobs,
        inputs.old_logprobs,
        inputs.advantages,
        inputs.mask,
        inputs.ref_logprobs,
        config,
        inputs.rollout_weights,
    )


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
    rollout_logprobs: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of docs/MATH.md §2-4 (and §9 with a rollout correction) on per-token log-probs.

    Args:
        logprobs: ``[B, T]`` or ``[N]``, log pi_theta of the sampled tokens (the differentiable input).
        old_logprobs: like ``logprobs``, the sampling policy's log-probs as the trainer computes them.
        advantages: ``[B]`` (broadcast over tokens) or ``[B, T]``; flat inputs take ``[N]`` or ``[1]``.
        mask: like ``logprobs``; non-zero = the token counts.
        ref_logprobs: like ``logprobs``; ``None`` means the reference is the sampler (``kappa = 1``).
        config: `LossConfig` (default: the ``rpg`` preset).
        num_items: global normaliser in the aggregation's unit (see `rpg_kernels.loss.aggregation`).
        entropy: optional per-token entropy like ``logprobs`` (differentiable); adds
            ``-entropy_coef * sum(entropy * weights)`` to the loss.
        rollout_logprobs: the sampler's (e.g. vLLM's) per-token log-probs, for ``config.rollout_is``.
        rollout_weights: an already computed rollout weight (``[B]``, ``[B, 1]`` or ``[B, T]``) instead.

    Returns:
        ``(loss, metrics)``: ``loss = sum(L * weights) - entropy_coef * sum(entropy * weights)``, a 0-d
        tensor in the compute dtype; ``metrics`` (see `loss_metrics`) with kl, clip_frac(_low/_high/_dual),
        ratio_mean, ratio_max, num_tokens, entropy (when given).
    """
    config = resolve_loss_config(config)
    raw = validate_loss_inputs(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        entropy,
        config=config,
        num_items=num_items,
        entropy_coef=entropy_coef,
        rollout_logprobs=rollout_logprobs,
        rollout_weights=rollout_weights,
    )
    inputs = prepare_loss_inputs(raw)
    per_token = _per_token(inputs, config)
    weights = aggregation_weights(
        inputs.mask, config.agg, num_items, inputs.dtype, config.max_completion_length
    )
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


def per_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    *,
    rollout_logprobs: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> TokenLosses:
    """The per-token losses before aggregation, for logging or a custom aggregation (docs/MATH.md §3).

    Same arguments and checks as `rpg_loss`. Returns `TokenLosses` of ``[B, T]`` tensors (flat inputs:
    ``[1, N]``): ``loss`` (differentiable in ``logprobs``; 0 on masked-out tokens), ``kl``, ``ratio`` and
    the clip-zone masks. ``aggregate(out.loss, mask, config.agg, num_items)`` equals `rpg_loss`'s loss
    (without an entropy bonus).
    """
    config = resolve_loss_config(config)
    raw = validate_loss_inputs(
        logprobs,
        old_logprobs,
        advantages,
        mask,
        ref_logprobs,
        config=config,
        rollout_logprobs=rollout_logprobs,
        rollout_weights=rollout_weights,
    )
    inputs = prepare_loss_inputs(raw)
    out = _per_token(inputs, config)
    zero = torch.zeros((), dtype=out.loss.dtype, device=out.loss.device)
    out.loss = torch.where(inputs.mask, out.loss, zero)
    return out


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
    rollout_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, dict[str, Tensor]]:
    """`rpg_loss`'s value and its gradients w.r.t. ``logprobs`` and ``entropy``, by autograd.

    Returns ``(loss, grad_logprobs, grad_entropy, metrics)``: ``loss`` detached 0-d (compute dtype);
    ``grad_logprobs`` shaped and typed like ``logprobs``; ``grad_entropy`` like ``entropy`` or ``None``.
    Inputs need not require grad. (The fused losses' Triton kernels compute the same per-token gradients
    themselves: `rpg_kernels.ops.token_loss_epilogue`.)
    """
    check_float_dtype("logprobs", logprobs)
    check_float_dtype("entropy", entropy)
    config = resolve_loss_config(config)
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
            rollout_weights=rollout_weights,
        )
        leaves = [leaf_logprobs] + ([leaf_entropy] if leaf_entropy is not None else [])
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    grad_entropy = grads[1] if leaf_entropy is not None else None
    return loss.detach(), grads[0], grad_entropy, metrics
