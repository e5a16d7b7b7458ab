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
from rpg_kernels.loss import loss_metrics, token_losses
from rpg_kernels.loss.inputs import LossInputs

__all__ = ["StreamingLoss", "supports_streaming"]


def supports_streaming(config: LossConfig) -> bool:
    """Whether each token's loss depends on its own log-prob only (every algo but ``gspo``)."""
    return config.algo != "gspo"


class StreamingLoss:
    """`rpg_loss` over the ``N = B * T`` tokens of prepared inputs, computed chunk by chunk.

    ``inputs``: from `rpg_kernels.loss.inputs.prepare_loss_inputs` (compute dtype, zeros where masked
    out); ``weights``: their aggregation weights ``[B, T]``; ``config`` a token-level algo.
    """

    def __init__(self, inputs: LossInputs, weights: Tensor, config: LossConfig, entropy_coef: float = 0.0):
        if not supports_streaming(config):
            raise ValueError(f"algo={config.algo!r} couples the tokens of a sequence; it cannot stream")
        flat = lambda t: None if t is None else t.expand(inputs.shape).reshape(-1)  # noqa: E731
        self.config, self.entropy_coef, self.dtype = config, float(entropy_coef), inputs.dtype
        self.shape = inputs.shape
        self.keep = inputs.mask.reshape(-1)
        self.old, self.advantages = flat(inputs.old_logprobs), flat(inputs.advantages)
        self.ref, self.rollout = flat(inputs.ref_logprobs), flat(inputs.rollout_weights)
        self.weights = weights.reshape(-1)
        n = self.keep.numel()
        self.loss = torch.zeros((), dtype=self.dtype, device=self.keep.device)
        self.kl = torch.zeros(n, dtype=self.dtype, device=self.keep.device)
        self.ratio = torch.zeros_like(self.kl)
        self.entropy = torch.zeros_like(self.kl)
        self.zones = torch.zeros(3, n, dtype=torch.bool, device=self.keep.device)  # low, high, dual

    def token_grads(
        self, tokens: slice | Tensor, logprob: Tensor, entropy: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """``(dL/dl [n], dL/dH [n] | None)`` for the masked-in tokens ``tokens`` (a slice or indices of the
        flat batch), given their ``logprob [n]`` and ``entropy [n]``; adds their share to the loss and
        metrics."""
        pick = lambda t: None if t is None else t[tokens][None]  # noqa: E731
        leaf = logprob.to(self.dtype)[None].requires_grad_(True)
        weights = self.weights[tokens]
        with torch.enable_grad():
            per_token = token_losses(
                leaf,
                pick(self.old),
                pick(self.advantages),
                pick(self.keep),
                pick(self.ref),
                self.config,
                pick(self.rollout),
            )
            chunk_loss = (per_token.loss[0] * weights).sum()
            (grad,) = torch.autograd.grad(chunk_loss, leaf, allow_unused=True)
        grad = torch.zeros_like(leaf) if grad is None else grad
        entropy = entropy.to(self.dtype)
        self.loss += chunk_loss.detach()
        self.kl[tokens] = per_token.kl[0]
        self.ratio[tokens] = per_token.ratio[0]
        self.zones[:, tokens] = torch.stack(
            [per_token.clip_low[0], per_token.clip_high[0], per_token.clip_dual[0]]
        )
        self.entropy[tokens] = entropy
        grad_entropy = None
        if self.entropy_coef != 0.0:
            self.loss -= self.entropy_coef * (entropy * weights).sum()
            grad_entropy = (-self.entropy_coef * weights).to(logprob.dtype)
        return grad[0].to(logprob.dtype), grad_entropy

    def finish(self) -> tuple[Tensor, dict[str, Tensor]]:
        """``(loss 0-d, metrics)`` over every token seen, as `rpg_loss` returns them."""
        low, high, dual = (z.reshape(self.shape) for z in self.zones)
        view = lambda t: t.reshape(self.shape)  # noqa: E731
        metrics = loss_metrics(
            self.keep.reshape(self.shape),
            view(self.kl),
            view(self.ratio),
            low,
            high,
            dual,
            view(self.entropy),
        )
        return self.loss, metrics
