"""Micro-batches of a mini-batch: fixed counts, token budgets (sequences grouped by length), packing.

`plan_micro_batches` cuts every mini-batch (the rows of one optimizer step) into micro-batches (one forward
and backward each) and returns their rows:

- fixed (``train.micro_batch_tokens = 0``): ``micro_batch_seqs`` consecutive rows each;
- token budget (``train.micro_batch_tokens = T``): every micro-batch costs at most ``T`` tokens. Padded, a
  micro-batch costs its rows times its longest row (prompt + completion, padding included: what the backbone
  computes); packed, the sum of its rows' lengths. Rows are sorted by length (longest first, ties by row) and
  split into the fewest micro-batches that fit; padded, among those the split with the least padding (an exact
  dynamic programme over the sorted order), packed, first-fit decreasing. A row longer than ``T`` gets a
  micro-batch of its own. Deterministic: the plan depends on the lengths only.

Every rank runs the same number of micro-batches (FSDP's collectives run in every micro-batch's forward and
backward): after one ``MAX`` collective per mini-batch, a rank with fewer splits its costliest micro-batch in
two until the counts match.

The normaliser ``num_items`` is the mini-batch's, whatever the split (`rpg_train.train.mini_batch_num_items`),
so the loss and the gradient equal those of fixed micro-batches (``tests/train/test_batching.py``).

Packing (``train.packing``) lays a micro-batch's rows back to back in one row without any padding
(`rpg_train.logprobs.PackedBatch`); attention then needs per-sequence ``position_ids``: varlen kernels
(``flash_attention_2``/``_3``) or ``flex_attention`` use them directly (``packing=auto`` turns it on for
these); ``sdpa``/``eager`` get transformers' block-diagonal mask, exact but ``T x T`` in memory
(``packing=always``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rpg_train import distributed
from rpg_train.config import PACKING_MODES

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class MicroBatchPlan:
    """The micro-batches of every mini-batch of a batch, as row indices (int64, CPU, ascending)."""

    mini_batches: list[slice]  # the rows of each optimizer step
    micro_batches: list[list[Tensor]]  # per mini-batch, its micro-batches' rows
    lengths: Tensor  # [B] prompt + completion tokens of every row
    min_width: int  # the narrowest a padded micro-batch gets (SequenceBatch.select keeps the scored columns)
    packed: bool

    def flat(self) -> list[Tensor]:
        """Every micro-batch, mini-batch by mini-batch."""
        return [rows for micros in self.micro_batches for rows in micros]

    def cost(self, rows: Tensor) -> int:
        """Tokens the backbone computes for ``rows``: their sum packed, rows x the widest row padded."""
        return micro_batch_cost(self.lengths[rows].tolist(), self.packed, self.min_width)

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def computed_tokens(self) -> int:
        """Tokens the backbone computes over all micro-batches, padding included."""
        return sum(self.cost(rows) for rows in self.flat())

    @property
    def padding_fraction(self) -> float:
        """Share of padding among the computed tokens (0 when packed)."""
        computed = self.computed_tokens
        return 1.0 - self.real_tokens / computed if computed else 0.0


def micro_batch_cost(lengths: list[int], packed: bool, min_width: int = 1) -> int:
    """Tokens one micro-batch of rows of these lengths costs (see the module docstring)."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(max(lengths), min_width)


def split_by_tokens(lengths: list[int], budget: int, *, packed: bool, min_width: int = 1) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` in micro-batches of at most ``budget`` tokens each (module
    docstring): the fewest micro-batches, then the least padding; longest first, each one's positions
    ascending."""
    if budget < 1:
        raise ValueError(f"budget must be >= 1 token, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if packed:
        bins: list[list[int]] = []
        room: list[int] = []
        for i in order:  # first fit decreasing
            slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
            if slot is None:
                bins.append([i])
                room.append(budget - lengths[i])
            else:
                bins[slot].append(i)
                room[slot] -= lengths[i]
        return [sorted(b) for b in bins]
    width = [max(lengths[i], min_width) for i in order]  # non-increasing
    n = len(order)
    # best[i]: (micro-batches, padded tokens) of the best split of order[i:]; a group order[i:j] costs
    # (j - i) * width[i], its first row being its widest
    best: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    cut = [n] * (n + 1)
    for i in range(n - 1, -1, -1):
        top = max(1, budget // width[i])  # rows that fit beside the widest (at least itself)
        choice, value = i + 1, None
        for j in range(i + 1, min(n, i + top) + 1):
            count, area = best[j]
            candidate = (count + 1, area + (j - i) * width[i])
            if value is None or candidate < value:
                choice, value = j, candidate
        best[i], cut[i] = value, choice
    groups, i = [], 0
    while i < n:
        groups.append(sorted(order[i : cut[i]]))
        i = cut[i]
    return groups


def _split_costliest(micros: list[Tensor], lengths: Tensor, packed: bool, min_width: int) -> list[Tensor]:
    """``micros`` with its costliest micro-batch of two or more rows split in two halves by length."""
    costs = [
        micro_batch_cost(lengths[rows].tolist(), packed, min_width) if len(rows) > 1 else -1
        for rows in micros
    ]
    k = max(range(len(micros)), key=lambda i: (costs[i], -i))
    if costs[k] < 0:
        raise RuntimeError("cannot split micro-batches of one row further to match the other ranks")
    rows = micros[k]
    by_length = rows[torch.sort(-lengths[rows], stable=True).indices]
    half = (len(rows) + 1) // 2
    first, second = by_length[:half].sort().values, by_length[half:].sort().values
    return micros[:k] + [first, second] + micros[k + 1 :]


def plan_micro_batches(
    lengths: Tensor,
    rows_per_step: int,
    *,
    micro_batch_seqs: int,
    micro_batch_tokens: int = 0,
    packed: bool = False,
    min_width: int = 1,
    info: distributed.DistInfo | None = None,
) -> MicroBatchPlan:
    """The micro-batches of mini-batches of ``rows_per_step`` consecutive rows of a batch whose rows hold
    ``lengths`` tokens (prompt + completion); see the module docstring. ``info``: the same count on each of
    its ranks."""
    lengths = lengths.to(torch.int64).cpu()
    total = len(lengths)
    mini_batches = [slice(s, min(s + rows_per_step, total)) for s in range(0, total, rows_per_step)]
    plan: list[list[Tensor]] = []
    for rows in mini_batches:
        if micro_batch_tokens <= 0:
            starts = range(rows.start, rows.stop, micro_batch_seqs)
            plan.append([torch.arange(s, min(s + micro_batch_seqs, rows.stop)) for s in starts])
            continue
        local = split_by_tokens(
            lengths[rows].tolist(), micro_batch_tokens, packed=packed, min_width=min_width
        )
        plan.append([torch.tensor(group, dtype=torch.int64) + rows.start for group in local])
    if info is not None and info.enabled and micro_batch_tokens > 0:
        for k, micros in enumerate(plan):
            target = int(distributed.reduce_max(float(len(micros)), info))
            while len(micros) < target:
                micros = _split_costliest(micros, lengths, packed, min_width)
            plan[k] = micros
    return MicroBatchPlan(mini_batches, plan, lengths, min_width, packed)


def packing_enabled(mode: str, model: nn.Module) -> bool:
    """Whether to pack (``train.packing``): ``always``, ``never``, or ``auto`` = the model's attention takes
    packed rows through ``position_ids`` without a dense mask (`VARLEN_ATTENTION`, or a hub flash kernel)."""
    if mode not in PACKING_MODES:
        raise ValueError(f"train.packing must be one of {PACKING_MODES}; got {mode!r}")
    if mode != "auto":
        return mode == "always"
    config = getattr(model, "config", None)
    attention = str(getattr(config, "_attn_implementation", None) or "")
    return attention in VARLEN_ATTENTION or "flash" in attention
