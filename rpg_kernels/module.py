"""`RPGLoss`: ``nn.Module`` wrapper of `rpg_kernels.fused_linear_rpg_loss`."""

from __future__ import annotations

from torch import Tensor, nn

from rpg_kernels.config import LossConfig, resolve_loss_config
from rpg_kernels.fused import fused_linear_rpg_loss


class RPGLoss(nn.Module):
    """The fused RPG-family loss on hidden states and an LM head (no ``[N, V]`` logits).

    ``RPGLoss(config)(hidden, weight, targets, old_logprobs, advantages, mask)`` returns
    ``(loss, metrics)``; see `rpg_kernels.fused_linear_rpg_loss` for shapes. Settings that stay fixed
    over training (config, temperature, entropy bonus, backend) live on the module.
    """

    def __init__(
        self,
        config: LossConfig | None = None,
        *,
        temperature: float = 1.0,
        entropy_coef: float = 0.0,
        ignore_index: int = -100,
        backend: str = "auto",
        method: str = "auto",
        deterministic: bool = True,
        workspace_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.config = resolve_loss_config(config)
        self.temperature = temperature
        self.entropy_coef = entropy_coef
        self.ignore_index = ignore_index
        self.backend = backend
        self.method = method
        self.deterministic = deterministic
        self.workspace_bytes = workspace_bytes

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        ref_logprobs: Tensor | None = None,
        bias: Tensor | None = None,
        num_items: float | int | Tensor | None = None,
        *,
        rollout_logprobs: Tensor | None = None,
        rollout_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return fused_linear_rpg_loss(
            hidden,
            weight,
            targets,
            old_logprobs,
            advantages,
            mask,
            ref_logprobs,
            config=self.config,
            temperature=self.temperature,
            bias=bias,
            entropy_coef=self.entropy_coef,
            num_items=num_items,
            ignore_index=self.ignore_index,
            rollout_logprobs=rollout_logprobs,
            rollout_weights=rollout_weights,
            backend=self.backend,
            method=self.method,
            deterministic=self.deterministic,
            workspace_bytes=self.workspace_bytes,
        )

    def extra_repr(self) -> str:
        return f"config={self.config}, temperature={self.temperature}, entropy_coef={self.entropy_coef}"
