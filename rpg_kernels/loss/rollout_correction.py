"""Rollout importance correction (docs/MATH.md §9): the training-inference mismatch weight.

The sampler (vLLM, its own kernels and precision) and the trainer never compute exactly the same
probabilities, so the rollouts come from ``pi_rollout``, not from the ``pi_old`` the loss assumes. The
constant weight ``exp(l_old - l_rollout)`` (per token, or its product over a sequence) turns the loss's
expectation under ``pi_old`` back into one under the sampler's samples. TRL's four modes::

    d          = l_old - l_rollout  on masked-in tokens, 0 elsewhere; NaN (an unscored token) -> 0
    token_*    : r = exp(d)                 [B, T]
    sequence_* : r = exp(sum_t d)           [B, 1]   (a product of token ratios, not a mean)
    *_truncate : r = clamp(r, min, max)
    *_mask     : r = 0 where r < min or r > max    (None: unbounded on that side)

The weight carries no gradient. Which terms it multiplies is the loss's business (`token_losses`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig

__all__ = ["rollout_weights", "rollout_mismatch_metrics"]


def _log_ratio(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``l_old - l_rollout`` on masked-in tokens (``±inf`` to ``±float max``, NaN to 0), 0 elsewhere."""
    diff = torch.where(mask, old_logprobs - rollout_logprobs, 0.0)
    return torch.nan_to_num(diff, nan=0.0)


@torch.no_grad()
def rollout_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, config: LossConfig
) -> Tensor | None:
    """The weight of ``config.rollout_is`` for ``[B, T]`` log-probs and a bool ``mask``.

    Returns ``[B, T]`` (token modes) or ``[B, 1]`` (sequence modes) in the log-probs' dtype (at least
    fp32), or ``None`` when ``config.rollout_is`` is ``None``.
    """
    if config.rollout_is is None:
        return None
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    diff = _log_ratio(old_logprobs.to(dtype), rollout_logprobs.to(dtype), mask)
    if config.rollout_is.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    low, high = config.rollout_is_min, config.rollout_is_max
    if config.rollout_is.endswith("truncate"):
        return ratio.clamp(min=low, max=high)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if low is not None:
        outside |= ratio < low
    if high is not None:
        outside |= ratio > high
    return ratio.masked_fill(outside, 0.0)


@torch.no_grad()
def rollout_mismatch_metrics(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, config: LossConfig | None = None
) -> dict[str, Tensor]:
    """How far the sampler is from the trainer on this batch (detached 0-d fp32 tensors, no host sync).

    ``mismatch_kl``: masked mean of ``k3 = exp(d) - 1 - d`` with ``d = l_old - l_rollout``, the k3
    estimate of ``KL(pi_rollout || pi_old)`` from the sampler's own samples; ``mismatch_abs_max``: the
    largest ``|d|``; with ``config.rollout_is`` set, ``rollout_weight_mean`` and ``rollout_outside_frac``
    (the share of tokens whose ratio fell outside ``[min, max]``, masked or truncated). Tokens whose
    sampler log-prob is NaN are left out.
    """
    scored = mask & ~torch.isnan(rollout_logprobs)
    diff = _log_ratio(old_logprobs.float(), rollout_logprobs.float(), scored)
    count = scored.sum().clamp(min=1).float()
    k3 = torch.where(scored, torch.expm1(diff) - diff, 0.0)
    metrics = {
        "mismatch_kl": k3.sum() / count,
        "mismatch_abs_max": diff.abs().amax() if diff.numel() else diff.sum(),
    }
    if config is not None and config.rollout_is is not None:
        weights = rollout_weights(old_logprobs, rollout_logprobs, mask, config).float().expand(mask.shape)
        token_ratio = torch.exp(
            diff.sum(-1, keepdim=True) if config.rollout_is.startswith("sequence") else diff
        )
        token_ratio = token_ratio.expand(mask.shape)
        low = config.rollout_is_min if config.rollout_is_min is not None else 0.0
        high = config.rollout_is_max if config.rollout_is_max is not None else float("inf")
        outside = (token_ratio < low) | (token_ratio > high)
        metrics["rollout_weight_mean"] = torch.where(mask, weights, 0.0).sum() / mask.sum().clamp(min=1)
        metrics["rollout_outside_frac"] = (outside & mask).sum() / mask.sum().clamp(min=1)
    return metrics
