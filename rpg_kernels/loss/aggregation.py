"""Loss aggregation of docs/MATH.md §4 as per-token weights: ``loss = sum(L * weights)``.

With ``m`` the 0/1 mask ``[B, T]``, ``n_b = sum_t m[b, t]`` and ``S`` the number of sequences
with at least one masked-in token:

| agg | weight of token (b, t) | unit of ``num_items`` |
|---|---|---|
| ``token-mean`` | ``m / sum(m)`` | tokens |
| ``seq-mean-token-mean`` | ``m / (n_b * S)`` | sequences |
| ``seq-mean-token-sum`` | ``m / S`` | sequences |
| ``seq-mean-token-sum-norm`` | ``m / (S * L)`` (Dr. GRPO, ``L`` below) | sequences |

``num_items`` replaces the denominator ``sum(m)`` or ``S``. Passing the full batch's count to each
part of a split batch (micro-batches, data-parallel ranks) makes the parts' losses SUM to the
full-batch loss: accumulate micro-batch gradients by summing. Data-parallel wrappers that AVERAGE
gradients over ranks need ``num_items = global_count / world_size`` to get the exact global mean.
``L`` is ``max_completion_length`` when given, else the tensor's token dim ``T``; for
``seq-mean-token-sum-norm`` give ``max_completion_length`` (Dr. GRPO's generation budget) so that
parts of different widths share ``L``. A zero denominator gives zero weights
(an all-masked batch has loss 0, not NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpg_kernels.config import AGGS

__all__ = ["aggregation_weights", "aggregate"]


def _safe_reciprocal(denominator: Tensor) -> Tensor:
    positive = denominator > 0
    return torch.where(positive, 1.0 / torch.where(positive, denominator, 1.0), 0.0)


def aggregation_weights(
    mask: Tensor,
    agg: str,
    num_items: float | int | Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    max_completion_length: int | None = None,
) -> Tensor:
    """Per-token weights ``[B, T]`` (``dtype``) for aggregation ``agg`` of a ``[B, T]`` mask.

    ``num_items``: the global normaliser in the aggregation's unit (tokens for ``token-mean``,
    sequences for the ``seq-mean-*`` modes); ``None`` counts this batch. ``max_completion_length``:
    the ``L`` of ``seq-mean-token-sum-norm`` (``None``: ``T``).
    """
    if agg not in AGGS:
        raise ValueError(f"unknown agg={agg!r}; valid: {', '.join(AGGS)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = (mask != 0).to(dtype)
    if num_items is not None:
        num_items = torch.as_tensor(num_items, dtype=dtype, device=m.device).reshape(())

    if agg == "token-mean":
        denominator = m.sum() if num_items is None else num_items
        return m * _safe_reciprocal(denominator)

    tokens_per_seq = m.sum(dim=-1, keepdim=True)
    num_seqs = (tokens_per_seq > 0).sum().to(dtype) if num_items is None else num_items
    if agg == "seq-mean-token-mean":
        return m * _safe_reciprocal(tokens_per_seq) * _safe_reciprocal(num_seqs)
    if agg == "seq-mean-token-sum":
        return m * _safe_reciprocal(num_seqs)
    length = m.shape[-1] if max_completion_length is None else max_completion_length
    return m * _safe_reciprocal(num_seqs * length)


def aggregate(
    values: Tensor,
    mask: Tensor,
    agg: str,
    num_items: float | int | Tensor | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """``sum(values * aggregation_weights(mask, agg, ...))`` for per-token ``values [B, T]``.

    Masked-out entries of ``values`` must be finite (they are multiplied by zero).
    """
    dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float32
    weights = aggregation_weights(mask, agg, num_items, dtype, max_completion_length)
    return (values.to(dtype) * weights).sum()
