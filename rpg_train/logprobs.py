"""Old/reference/current log-probs and the policy loss through the fused kernels: never ``[N, V]`` logits.

Sequences are ``prompt + completion`` right-padded to ``S``. With ``K = S - shortest prompt``, the last ``K``
positions hold every completion token of the batch, so one backbone pass with ``logits_to_keep = K`` gives
``[B, K, H]`` hidden states whose row ``k`` predicts token ``S-K+k``; ``mask`` marks the completion tokens
(prompt and padding tokens among the ``K`` get target ``-100`` and mask 0).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import rpg_kernels as rk
from rpg_kernels.integrations.hf import completion_hidden_states, lm_head_params, run_inside_forward

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


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module,
    batch: SequenceBatch,
    *,
    micro_batch: int,
    temperature: float = 1.0,
    backend: str = "auto",
    bf16: bool = False,
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies ``[B, K]`` (float32) of ``batch.targets`` under ``model``.

    Runs in micro-batches of ``micro_batch`` sequences; the result lives on ``batch``'s device.
    """
    weight, bias = lm_head_params(model)
    logprobs = torch.zeros(batch.targets.shape, dtype=torch.float32, device=batch.targets.device)
    entropy = torch.zeros_like(logprobs)
    for start in range(0, len(batch), micro_batch):
        rows = slice(start, start + micro_batch)
        part = batch.select(rows)
        with autocast_context(part.input_ids.device, bf16):
            hidden = completion_hidden_states(model, part.input_ids, part.attention_mask, part.logits_to_keep)
            logp, ent = rk.fused_linear_logprobs(
                hidden,
                weight,
                part.targets,
                bias=bias,
                temperature=temperature,
                return_entropy=True,
                backend=backend,
            )
        keep = part.logits_to_keep
        logprobs[rows, :keep] = logp.float()
        entropy[rows, :keep] = ent.float()
    return logprobs * batch.mask, entropy * batch.mask


def policy_loss(
    model: nn.Module,
    batch: SequenceBatch,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    config: rk.LossConfig,
    *,
    num_items: float | None,
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    backend: str = "auto",
    bf16: bool = False,
) -> tuple[Tensor, dict]:
    """The fused RPG loss of one micro-batch (differentiable in ``model``'s parameters).

    ``model`` may be wrapped (DDP): backbone and fused loss run inside its forward so that gradients sync.
    ``old_logprobs``/``ref_logprobs`` are ``[B, K]`` aligned with ``batch.targets``; ``advantages`` ``[B]``
    or ``[B, K]``; ``num_items`` is the global normaliser (see ``rpg_kernels.loss``).
    """

    def loss_fn(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, dict]:
        weight, bias = lm_head_params(model)
        with autocast_context(input_ids.device, bf16):
            hidden = completion_hidden_states(model, input_ids, attention_mask, batch.logits_to_keep)
            return rk.fused_linear_rpg_loss(
                hidden,
                weight,
                batch.targets,
                old_logprobs,
                advantages,
                batch.mask,
                ref_logprobs=ref_logprobs,
                config=config,
                temperature=temperature,
                bias=bias,
                entropy_coef=entropy_coef,
                num_items=num_items,
                backend=backend,
            )

    return run_inside_forward(model, loss_fn, batch.input_ids, batch.attention_mask)
