"""Old/reference/current log-probs and the policy loss through the fused kernels: never ``[N, V]`` logits.

`PolicyLoss` holds the causal LM and computes both; it is the module DDP wraps and FSDP shards.

Sequences are ``prompt + completion`` right-padded to ``S``. With ``K = S - shortest prompt``, the last ``K``
positions hold every completion token of the batch, so one backbone pass with ``logits_to_keep = K`` gives
``[B, K, H]`` hidden states whose row ``k`` predicts token ``S-K+k``; ``mask`` marks the completion tokens
(prompt and padding tokens among the ``K`` get target ``-100`` and mask 0).

`SequenceBatch.pack` lays a micro-batch's sequences back to back in one row instead (`PackedBatch`: no
padding, per-sequence ``position_ids``); its targets, mask and log-probs keep the ``[B, K]`` layout of the
padded micro-batch, so the fused loss, the normaliser and the old/reference log-probs do not depend on the
layout.
Which rows form a micro-batch: `rpg_train.batching`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

import rpg_kernels as rk
from rpg_kernels.integrations.hf import completion_hidden_states, lm_head_params, packed_hidden_states

if TYPE_CHECKING:
    from rpg_train.batching import MicroBatchPlan

IGNORE_INDEX = -100


@dataclass
class SequenceBatch:
    """Token tensors of ``B`` prompt+completion sequences (CPU or device)."""

    input_ids: Tensor  # [B, S] long, right-padded
    attention_mask: Tensor  # [B, S] long
    targets: Tensor  # [B, K] long: completion token ids, IGNORE_INDEX elsewhere
    mask: Tensor  # [B, K] float: 1 on completion tokens

    @property
    def logits_to_keep(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: slice | Tensor) -> SequenceBatch:
        """A sub-batch, trimmed of columns that are padding in every selected row."""
        ids, attn, tgt, mask = (
            t[rows] for t in (self.input_ids, self.attention_mask, self.targets, self.mask)
        )
        prefix = self.input_ids.shape[1] - self.targets.shape[1]  # columns before the K scored ones
        seq_len = max(int(attn.sum(1).max()), prefix + 1)
        keep = seq_len - prefix  # K shrinks by the trimmed padding columns
        return SequenceBatch(ids[:, :seq_len], attn[:, :seq_len], tgt[:, :keep], mask[:, :keep])

    def to(self, device: torch.device) -> SequenceBatch:
        return SequenceBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.attention_mask, self.targets, self.mask)
            )
        )

    def pack(self) -> PackedBatch:
        """These sequences back to back in one row, without padding; targets and mask unchanged."""
        real = self.attention_mask.bool()
        lengths = real.sum(1)
        offsets = lengths.cumsum(0) - lengths  # where each sequence starts in the packed row
        prefix = self.input_ids.shape[1] - self.targets.shape[1]
        # target column k of row i is token prefix + k of its sequence, predicted by the position before it
        rows = offsets[:, None] + prefix - 1 + torch.arange(self.targets.shape[1])
        rows = torch.where(
            self.mask > 0, rows, torch.zeros_like(rows)
        )  # unscored: any row (its gradient is 0)
        return PackedBatch(
            input_ids=self.input_ids[real][None],
            position_ids=(real.cumsum(1) - 1)[real][None],
            rows=rows,
            targets=self.targets,
            mask=self.mask,
        )


@dataclass
class PackedBatch:
    """``B`` sequences packed into one row of ``T`` real tokens (CPU or device); see `SequenceBatch.pack`."""

    input_ids: Tensor  # [1, T] long
    position_ids: Tensor  # [1, T] long: 0, 1, ... within each sequence
    rows: Tensor  # [B, K] long: the packed position whose hidden state predicts targets[b, k] (0 if unscored)
    targets: Tensor  # [B, K] long: as the padded micro-batch's
    mask: Tensor  # [B, K] float

    @property
    def logits_to_keep(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return self.targets.shape[0]

    def to(self, device: torch.device) -> PackedBatch:
        return PackedBatch(
            *(
                t.to(device, non_blocking=True)
                for t in (self.input_ids, self.position_ids, self.rows, self.targets, self.mask)
            )
        )


def build_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> SequenceBatch:
    """Right-padded ``prompt + completion`` sequences and their completion targets/mask (see module doc)."""
    if len(prompt_ids) != len(completion_ids) or not prompt_ids:
        raise ValueError(
            f"prompt_ids ({len(prompt_ids)}) and completion_ids ({len(completion_ids)}) must be "
            "non-empty lists of equal length"
        )
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    lengths = [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)]
    seq_len = max(lengths) + (1 if max(lengths) == min(len(p) for p in prompt_ids) else 0)
    keep = seq_len - min(len(p) for p in prompt_ids)
    batch = len(prompt_ids)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    targets = torch.full((batch, keep), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        tokens = list(prompt) + list(completion)
        input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[i, : len(tokens)] = 1
        start = len(prompt) - (seq_len - keep)  # column of the first completion token among the K
        targets[i, start : start + len(completion)] = torch.tensor(list(completion), dtype=torch.long)
    mask = (targets != IGNORE_INDEX).float()
    return SequenceBatch(input_ids, attention_mask, targets, mask)


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when ``enabled``; nothing on CPU (fp32 there)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PolicyLoss(nn.Module):
    """A causal LM and the fused loss as one module: what DDP wraps and FSDP2 shards (as the root).

    ``forward`` runs the backbone and `rpg_kernels.fused.fused_linear_rpg_loss` in one forward call, so the
    wrapper's hooks run around both: DDP's gradient sync, and FSDP's all-gather of the root's own parameters
    (embedding, final norm, LM head; tied or not), which is why the head's weight is read inside it.
    ``logprobs`` is its no-gradient twin (`rpg_train.parallel` registers it with FSDP as a forward method).
    Without a ``loss_config`` (a frozen reference) only ``logprobs`` is available.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_config: rk.LossConfig | None = None,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        backend: str = "auto",
        bf16: bool = False,
    ) -> None:
        super().__init__()
        self.model = model  # a transformers *ForCausalLM
        self.loss_config, self.temperature, self.entropy_coef = loss_config, temperature, entropy_coef
        self.backend, self.bf16 = backend, bf16

    def _head_inputs(self, batch: SequenceBatch | PackedBatch) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(hidden [B, K, H], head weight [V, H], head bias [V] | None)`` of a padded or packed batch."""
        weight, bias = lm_head_params(self.model)
        if isinstance(batch, PackedBatch):
            hidden = packed_hidden_states(self.model, batch.input_ids, batch.position_ids, batch.rows)
        else:
            hidden = completion_hidden_states(
                self.model, batch.input_ids, batch.attention_mask, batch.logits_to_keep
            )
        return hidden, weight, bias

    def forward(
        self,
        batch: SequenceBatch | PackedBatch,
        old_logprobs: Tensor,
        advantages: Tensor,
        ref_logprobs: Tensor | None = None,
        *,
        num_items: float | None,
        rollout_logprobs: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one micro-batch (0-d, differentiable) and its metrics (0-d tensors, not synced).

        ``old_logprobs``/``ref_logprobs`` ``[B, K]`` float32 aligned with ``batch.targets``; ``advantages``
        ``[B]`` or ``[B, K]``; ``num_items`` the global normaliser (see ``rpg_kernels.loss``);
        ``rollout_logprobs`` ``[B, K]`` the engine's (NaN: unscored), for ``loss_config.rollout_is``.
        """
        if self.loss_config is None:
            raise RuntimeError("this PolicyLoss has no loss_config: it computes log-probs only")
        with autocast_context(batch.input_ids.device, self.bf16):
            hidden, weight, bias = self._head_inputs(batch)
            return rk.fused_linear_rpg_loss(
                hidden,
                weight,
                batch.targets,
                old_logprobs,
                advantages,
                batch.mask,
                ref_logprobs=ref_logprobs,
                config=self.loss_config,
                temperature=self.temperature,
                bias=bias,
                entropy_coef=self.entropy_coef,
                num_items=num_items,
                rollout_logprobs=rollout_logprobs,
                backend=self.backend,
            )

    def logprobs(self, batch: SequenceBatch | PackedBatch) -> tuple[Tensor, Tensor]:
        """Per-token log-probs and entropies ``[B, K]`` of ``batch.targets`` (in the compute dtype)."""
        with autocast_context(batch.input_ids.device, self.bf16):
            hidden, weight, bias = self._head_inputs(batch)
            return rk.fused_linear_logprobs(
                hidden,
                weight,
                batch.targets,
                bias=bias,
                temperature=self.temperature,
                return_entropy=True,
                backend=self.backend,
            )


@torch.no_grad()
def sequence_logprobs(
    policy: PolicyLoss,
    batch: SequenceBatch,
    *,
    micro_batch: int | None = None,
    plan: MicroBatchPlan | None = None,
    device: torch.device | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies ``[B, K]`` (float32, on ``device``) of ``batch.targets``.

    The micro-batches: ``plan``'s (`rpg_train.batching`: token budgets, packing), else ``micro_batch``
    consecutive sequences each. ``batch`` may stay on the CPU: each micro-batch is cut (and packed) there,
    with no device sync, then moved to ``device`` (default: ``batch``'s). Under FSDP the root's parameters,
    which a no-gradient pass leaves gathered (no backward frees them), are freed at the end.
    """
    if (micro_batch is None) == (plan is None):
        raise ValueError("sequence_logprobs: give exactly one of micro_batch and plan")
    device = batch.targets.device if device is None else device
    logprobs = torch.zeros(batch.targets.shape, dtype=torch.float32, device=device)
    entropy = torch.zeros_like(logprobs)
    if plan is None:
        parts = [torch.arange(s, min(s + micro_batch, len(batch))) for s in range(0, len(batch), micro_batch)]
    else:
        parts = plan.flat()
    for rows in parts:
        part = batch.select(rows)
        logp, ent = policy.logprobs((part.pack() if plan is not None and plan.packed else part).to(device))
        keep, index = part.logits_to_keep, rows.to(device)
        logprobs[index, :keep] = logp.float()
        entropy[index, :keep] = ent.float()
    if isinstance(policy, FSDPModule):
        policy.reshard()
    mask = batch.mask.to(device)
    return logprobs * mask, entropy * mask
