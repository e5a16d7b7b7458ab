"""Old/reference/current log-probs and the policy loss through the fused kernels: never ``[N, V]`` logits.

`PolicyLoss` holds the causal LM and computes both; it is the module DDP wraps and FSDP shards.

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
from torch.distributed.fsdp import FSDPModule

import rpg_kernels as rk
from rpg_kernels.integrations.hf import completion_hidden_states, lm_head_params

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

    def _head_inputs(self, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(hidden [B, K, H], head weight [V, H], head bias [V] | None)`` of ``batch``."""
        weight, bias = lm_head_params(self.model)
        hidden = completion_hidden_states(
            self.model, batch.input_ids, batch.attention_mask, batch.logits_to_keep
        )
        return hidden, weight, bias

    def forward(
        self,
        batch: SequenceBatch,
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

    def logprobs(self, batch: SequenceBatch) -> tuple[Tensor, Tensor]:
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
    policy: PolicyLoss, batch: SequenceBatch, *, micro_batch: int, device: torch.device | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs and entropies ``[B, K]`` (float32, on ``device``) of ``batch.targets``.

    ``batch`` may stay on the CPU: each micro-batch of ``micro_batch`` sequences is trimmed there (no device
    sync) and then moved to ``device`` (default: ``batch``'s). Under FSDP the root's parameters, which a
    no-gradient pass leaves gathered (no backward frees them), are freed at the end.
    """
    device = batch.targets.device if device is None else device
    logprobs = torch.zeros(batch.targets.shape, dtype=torch.float32, device=device)
    entropy = torch.zeros_like(logprobs)
    for start in range(0, len(batch), micro_batch):
        rows = slice(start, start + micro_batch)
        part = batch.select(rows).to(device)
        logp, ent = policy.logprobs(part)
        keep = part.logits_to_keep
        logprobs[rows, :keep] = logp.float()
        entropy[rows, :keep] = ent.float()
    if isinstance(policy, FSDPModule):
        policy.reshard()
    mask = batch.mask.to(device)
    return logprobs * mask, entropy * mask
