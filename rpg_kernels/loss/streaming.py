"""`rpg_loss` fed one chunk of tokens at a time, for the single-pass fused path.

For token-level algos (every algo but ``gspo``, whose sequence ratio couples the tokens of a sequence)
a token's loss depends only on its own log-prob, and the aggregation weights only on the mask and
``num_items``; so ``dL/dl`` and ``dL/dH`` of a token are known as soon as its log-prob and entropy are.
`StreamingLoss.token_grads` returns them for a chunk of flat token rows (the ``TokenGrads`` callback of
`rpg_kernels.ops.chunked.chunked_forward_backward`) and accumulates the loss; `StreamingLoss.finish`
returns ``(loss, metrics)`` as `rpg_loss` would on the whole batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig
from rpg_kernels.loss import aggregation_weights, loss_metrics, prepare_loss_inputs, token_losses

__all__ = ["StreamingLoss", "supports_streaming"]


def supports_streaming(config: LossConfig) -> bool:
    """Whether each token's loss depends on its own log-prob only (every algo but ``gspo``)."""
    return config.algo != "gspo"


class StreamingLoss:
    """`rpg_loss` over per-token inputs of ``N = B * T`` tokens, computed chunk by chunk.

    Args as `rpg_loss` (validated here), plus ``logprob_dtype``: the dtype the log-probs will arrive in
    (fp32, or fp64 for fp64 hidden states), which joins the compute dtype.
    """

    def __init__(
        self,
        logprob_dtype: torch.dtype,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logprobs: Tensor | None,
        config: LossConfig,
        num_items: float | int | Tensor | None = None,
        entropy_coef: float = 0.0,
    ):
        if not supports_streaming(config):
            raise ValueError(f"algo={config.algo!r} couples the tokens of a sequence; it cannot stream")
        placeholder = old_logprobs.to(logprob_dtype)  # only its dtype and shape matter
        inputs = prepare_loss_inputs(placeholder, old_logprobs, advantages, mask, ref_logprobs)
        self.config, self.entropy_coef, self.dtype = config, float(entropy_coef), inputs.dtype
        self.keep = inputs.mask.reshape(1, -1)
        self.old = inputs.old_logprobs.reshape(1, -1)
        self.advantages = inputs.advantages.reshape(1, -1)
        self.ref = inputs.ref_logprobs.reshape(1, -1) if inputs.ref_logprobs is not None else None
        self.weights = aggregation_weights(inputs.mask, config.agg, num_items, self.dtype).reshape(1, -1)
        n = self.keep.shape[1]
        self.loss = torch.zeros((), dtype=self.dtype, device=self.keep.device)
        self.kl = torch.zeros(1, n, dtype=self.dtype, device=self.keep.device)
        self.ratio = torch.zeros_like(self.kl)
        self.entropy = torch.zeros_like(self.kl)
        self.zones = torch.zeros(3, 1, n, dtype=torch.bool, device=self.keep.device)  # low, high, dual

    def token_grads(self, rows: slice, logprob: Tensor, entropy: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(dL/dl [n], dL/dH [n] | None)`` for the tokens ``rows`` of the flat batch, given their
        ``logprob [n]`` and ``entropy [n]``; adds their share to the loss and metrics."""
        keep = self.keep[:, rows]
        zero = torch.zeros((), dtype=self.dtype, device=keep.device)
        leaf = torch.where(keep, logprob.reshape(1, -1).to(self.dtype), zero).requires_grad_(True)
        ref = self.ref[:, rows] if self.ref is not None else None
        weights = self.weights[:, rows]
        with torch.enable_grad():
            per_token = token_losses(
                leaf, self.old[:, rows], self.advantages[:, rows], keep, ref, self.config
            )
            chunk_loss = (per_token.loss * weights).sum()
            (grad,) = torch.autograd.grad(chunk_loss, leaf, allow_unused=True)
        grad = torch.zeros_like(leaf) if grad is None else grad
        clean_entropy = torch.where(keep, entropy.reshape(1, -1).to(self.dtype), zero)
        self.loss += chunk_loss.detach()
        self.kl[:, rows] = per_token.kl
        self.ratio[:, rows] = per_token.ratio
        self.zones[:, :, rows] = torch.stack([per_token.clip_low, per_token.clip_high, per_token.clip_dual])
        self.entropy[:, rows] = clean_entropy
        grad_entropy = None
        if self.entropy_coef != 0.0:
            self.loss -= self.entropy_coef * (clean_entropy * weights).sum()
            grad_entropy = (-self.entropy_coef * weights).reshape(-1).to(logprob.dtype)
        return grad.reshape(-1).to(logprob.dtype), grad_entropy

    def finish(self) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss 0-d, metrics)`` over every token seen, as `rpg_loss` returns them."""
        low, high, dual = self.zones
        return self.loss, loss_metrics(self.keep, self.kl, self.ratio, low, high, dual, self.entropy)
