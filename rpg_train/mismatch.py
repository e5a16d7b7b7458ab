"""The training-inference mismatch (docs/MATH.md §9): the engine's log-probs beside the trainer's.

The rollout engine scores every token it samples under its own weights and kernels (vLLM; bf16 on a GPU),
and the trainer recomputes the same tokens' log-probs (``old_logprobs``) with its own. They never agree
exactly, so the rollouts come from a slightly different policy than the loss assumes. Every step logs how
far apart they are (`mismatch_sums`), and with ``algo.rollout_correction`` the loss weights the tokens (or
sequences) by ``exp(old - rollout)``, bounded (`rpg_kernels.LossConfig.rollout_is`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import rpg_kernels as rk

# logged every step: their reduction over ranks (token-weighted means; a max)
MISMATCH_MEANS = ("mismatch_kl", "rollout_outside_frac", "rollout_weight_mean")


def align_rollout_logprobs(mask: Tensor, logprobs: list[list[float] | None]) -> Tensor:
    """The engine's log-probs ``[B, K]`` float32 (CPU), aligned with the batch's ``targets``.

    Row ``i``'s completion tokens are its ``mask`` positions, in order (however the batch lays them out),
    and get ``logprobs[i]`` (one per completion token); the other positions, and rows whose engine gave no
    log-probs (``None``), are NaN, which the loss and the metrics read as unscored (ratio 1).
    """
    mask = mask.bool().cpu()
    if len(logprobs) != mask.shape[0]:
        raise ValueError(f"{len(logprobs)} rows of engine log-probs for a batch of {mask.shape[0]} rows")
    lengths = mask.sum(1).tolist()
    flat: list[float] = []
    for row, (values, length) in enumerate(zip(logprobs, lengths)):
        if values is None:
            values = [math.nan] * length
        elif len(values) != length:
            raise ValueError(f"rollout {row}: the engine gave {len(values)} log-probs for {length} tokens")
        flat.extend(values)
    out = torch.full(mask.shape, math.nan, dtype=torch.float32)
    out[mask] = torch.tensor(flat, dtype=torch.float32)  # boolean indexing runs row-major: row by row
    return out


def mismatch_sums(
    old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, config: rk.LossConfig
) -> tuple[dict[str, float], dict[str, float], float]:
    """``(sums, counts, max |old - rollout|)`` of this rank's tokens, for `rpg_train.distributed.
    reduce_metrics` (every rank returns the same keys) and a max over ranks. One host sync.

    ``mismatch_kl``: mean k3 estimate of ``KL(pi_rollout || pi_old)`` over the scored tokens;
    ``rollout_outside_frac``: the share of completion tokens whose ratio is outside the correction's bounds
    (with the correction off, token ratios against ``algo.rollout_correction_min/max``: what it would
    drop or clamp); ``rollout_weight_mean``: the correction's mean weight (only when it is on).
    """
    mask = mask.bool()
    on = config.rollout_is is not None
    bounds = config if on else config.replace(rollout_is="token_mask")  # its bounds, for the fraction only
    metrics = rk.rollout_mismatch_metrics(old_logprobs, rollout_logprobs, mask, bounds)
    scored = (mask & ~torch.isnan(rollout_logprobs)).sum()
    tokens = mask.sum()
    keys = MISMATCH_MEANS if on else MISMATCH_MEANS[:2]
    # host sync, once per step: the step's mismatch metrics and their token counts
    values = torch.stack(
        [metrics["mismatch_kl"] * scored, metrics["rollout_outside_frac"] * tokens]
        + ([metrics["rollout_weight_mean"] * tokens] if on else [])
        + [metrics["mismatch_abs_max"], scored.float(), tokens.float()]
    ).tolist()
    *sums, abs_max, n_scored, n_tokens = values
    counts = {key: n_scored if key == "mismatch_kl" else n_tokens for key in keys}
    if n_scored == 0:  # no engine log-probs: nothing to report (a zero count drops the key)
        counts = dict.fromkeys(keys, 0.0)
    return dict(zip(keys, sums)), counts, abs_max
