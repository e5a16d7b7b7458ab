"""Advantage estimators of docs/MATH.md §5 (trainer side).

Sequence-level estimators take flat rewards ``[num_prompts * group_size]``, each prompt's
completions consecutive, and return advantages of the same shape (broadcast over tokens by
`rpg_kernels.rpg_loss`). `reinforce_pp_advantages` returns per-token advantages ``[B, T]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpg_kernels.checks import check_finite_masked, check_float_dtype, check_same_device, check_same_shape

__all__ = [
    "compute_advantages",
    "group_mean_advantages",
    "group_normalized_advantages",
    "rloo_advantages",
    "batch_mean_advantages",
    "reinforce_pp_advantages",
    "ADVANTAGE_ESTIMATORS",
    "ADVANTAGE_ALIASES",
]


def _grouped(rewards: Tensor, group_size: int, min_group_size: int = 1) -> Tensor:
    """``rewards [P * G]`` as ``[P, G]`` (float), with clear errors."""
    check_float_dtype("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat [num_prompts * group_size], got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size < min_group_size:
        raise ValueError(f"group_size must be >= {min_group_size} for this estimator, got {group_size}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a positive multiple of group_size={group_size}"
        )
    check_finite_masked("rewards", rewards)
    return rewards.reshape(-1, group_size)


def group_mean_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RPG / Dr. GRPO: ``A = R - mean(R over the prompt's group)`` (no std division)."""
    grouped = _grouped(rewards, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def group_normalized_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO: ``A = (R - mean) / (std + eps)`` per group (unbiased std, as TRL; ``group_size >= 2``)."""
    grouped = _grouped(rewards, group_size, min_group_size=2)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    return (centred / (grouped.std(dim=1, keepdim=True) + eps)).reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: ``A_i = R_i - mean_{j != i} R_j`` within the group (``group_size >= 2``)."""
    grouped = _grouped(rewards, group_size, min_group_size=2)
    leave_one_out = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - leave_one_out).reshape(-1)


def batch_mean_advantages(rewards: Tensor, group_size: int = 1) -> Tensor:
    """``A = R - mean(R over the batch)`` (``group_size`` only checks the layout)."""
    grouped = _grouped(rewards, group_size)
    return (grouped - grouped.mean()).reshape(-1)


def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    old_logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    beta_kl: float = 0.0,
    kl_estimator: str = "k1",
    eps: float = 1e-8,
) -> Tensor:
    """REINFORCE++: per-token returns, whitened over the batch's masked tokens. Returns ``[B, T]``.

    Token reward ``r_t = -beta_kl * k(l_old - l_ref)`` (``k1 = x``, ``k2 = x^2 / 2``) on masked tokens,
    plus the sequence reward ``rewards[b]`` on each sequence's last masked token; returns
    ``G_t = sum_{s >= t} r_s``; advantages ``(G - mean) / (std + eps)`` with the mean and (biased)
    std over all masked tokens of the batch; 0 on masked-out tokens.
    """
    check_float_dtype("rewards", rewards)
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    if tuple(rewards.shape) != (mask.shape[0],):
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)}, expected [{mask.shape[0]}] (one per sequence)"
        )
    check_same_device(rewards=rewards, mask=mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    check_finite_masked("rewards", rewards)
    if kl_estimator not in ("k1", "k2"):
        raise ValueError(f"unknown kl_estimator={kl_estimator!r}; valid: k1, k2")
    if beta_kl < 0:
        raise ValueError(f"beta_kl must be >= 0, got {beta_kl}")
    keep = mask != 0
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    token_rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if beta_kl > 0:
        if old_logprobs is None or ref_logprobs is None:
            raise ValueError("old_logprobs and ref_logprobs are required when beta_kl > 0")
        for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
            check_float_dtype(name, t)
            check_same_shape("mask", mask, **{name: t})
            check_finite_masked(name, t, keep)
        log_ratio = torch.where(keep, old_logprobs.to(dtype) - ref_logprobs.to(dtype), 0.0)
        kl = log_ratio if kl_estimator == "k1" else 0.5 * log_ratio.square()
        token_rewards = -beta_kl * kl
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(keep)
    last = torch.where(keep, positions, -1).amax(dim=1)  # -1 for sequences with no masked token
    has_tokens = last >= 0
    rows = torch.nonzero(has_tokens).squeeze(1)
    token_rewards = token_rewards.index_put((rows, last[rows]), rewards.to(dtype)[rows], accumulate=True)

    returns = token_rewards.flip(1).cumsum(1).flip(1)
    count = keep.sum().clamp(min=1)
    mean = torch.where(keep, returns, 0.0).sum() / count
    var = torch.where(keep, (returns - mean).square(), 0.0).sum() / count
    return torch.where(keep, (returns - mean) / (var.sqrt() + eps), 0.0)


ADVANTAGE_ESTIMATORS = {
    "group_mean": group_mean_advantages,
    "group_normalized": group_normalized_advantages,
    "rloo": rloo_advantages,
    "batch_mean": batch_mean_advantages,
    "reinforce_pp": reinforce_pp_advantages,
}
# Each algorithm's usual estimator (docs/MATH.md §5).
ADVANTAGE_ALIASES = {  # algo names accepted by compute_advantages, and the estimator each means
    "rpg": "group_mean",
    "rpg_reinforce": "group_mean",
    "dr_grpo": "group_mean",
    "grpo": "group_normalized",
    "dapo": "group_normalized",
    "gspo": "group_normalized",
    "cispo": "group_normalized",
}


def compute_advantages(name: str, rewards: Tensor, group_size: int = 1, **kwargs) -> Tensor:
    """Dispatch by estimator name (``group_mean``, ``group_normalized``, ``rloo``, ``batch_mean``,
    ``reinforce_pp``) or by algo name (``rpg`` -> group_mean, ``grpo`` -> group_normalized, ...).

    ``reinforce_pp`` takes ``mask`` (and ``old_logprobs``, ``ref_logprobs``, ``beta_kl``, ...) as
    keyword arguments and ignores ``group_size``.
    """
    estimator = ADVANTAGE_ALIASES.get(name, name)
    if estimator not in ADVANTAGE_ESTIMATORS:
        valid = sorted(ADVANTAGE_ESTIMATORS) + sorted(ADVANTAGE_ALIASES)
        raise ValueError(f"unknown advantage estimator name={name!r}; valid: {', '.join(valid)}")
    if estimator == "reinforce_pp":
        if "mask" not in kwargs:
            raise ValueError("reinforce_pp advantages need mask=[B, T]")
        return reinforce_pp_advantages(rewards, **kwargs)
    return ADVANTAGE_ESTIMATORS[estimator](rewards, group_size, **kwargs)
