"""The reference policy of the KL term and when it is refreshed (RPG's *iterative reference*).

Policies (``algo.ref_update``):

- ``every_step`` (default, the paper's): the reference is the policy that sampled this step's rollouts,
  so ``l_ref = l_old`` and no reference model or extra forward pass is needed.
- ``every_k``: a frozen copy of the policy, refreshed every ``k`` optimizer steps.
- ``kl_threshold``: a frozen copy, refreshed when the moving average of the token KL exceeds a threshold.
- ``never``: the initial policy, kept frozen for the whole run (classic fixed-reference KL).
"""

from __future__ import annotations

import copy
from typing import Any

import torch


class ReferencePolicy:
    """Owns the frozen reference model (if any) and the refresh rule."""

    def __init__(
        self,
        policy: torch.nn.Module,
        mode: str = "every_step",
        every_k: int = 10,
        kl_threshold: float = 0.05,
        kl_ema: float = 0.9,
    ) -> None:
        if mode not in ("every_step", "every_k", "kl_threshold", "never"):
            raise ValueError(f"ref_update must be every_step, every_k, kl_threshold or never; got {mode!r}")
        if mode == "every_k" and every_k < 1:
            raise ValueError(f"ref_update_k must be >= 1, got {every_k}")
        if not 0.0 <= kl_ema < 1.0:
            raise ValueError(f"ref_kl_ema must be in [0, 1), got {kl_ema}")
        self.mode, self.every_k, self.kl_threshold, self.kl_ema = mode, every_k, kl_threshold, kl_ema
        self.model: torch.nn.Module | None = None
        self.kl_average: float | None = None
        self.steps_since_update = 0
        self.updates = 0
        if mode != "every_step":
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)

    @property
    def is_old_policy(self) -> bool:
        """True when the reference equals the sampling policy (pass ``ref_logprobs=None``)."""
        return self.model is None

    def after_optimizer_step(self, policy: torch.nn.Module, token_kl: float) -> bool:
        """Record one optimizer step's token KL; refresh the reference if the rule says so.

        Returns True when the reference was refreshed.
        """
        self.steps_since_update += 1
        self.kl_average = (
            token_kl
            if self.kl_average is None
            else (self.kl_ema * self.kl_average + (1.0 - self.kl_ema) * token_kl)
        )
        refresh = (self.mode == "every_k" and self.steps_since_update >= self.every_k) or (
            self.mode == "kl_threshold" and self.kl_average > self.kl_threshold
        )
        if refresh:
            self.model.load_state_dict(policy.state_dict())
            self.steps_since_update = 0
            self.kl_average = None
            self.updates += 1
        return refresh

    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "kl_average": self.kl_average,
            "steps_since_update": self.steps_since_update,
            "updates": self.updates,
            "model": None if self.model is None else self.model.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint's ref_update is {state['mode']!r}, this run's is {self.mode!r}")
        self.kl_average, self.steps_since_update = state["kl_average"], state["steps_since_update"]
        self.updates = state["updates"]
        if self.model is not None:
            self.model.load_state_dict(state["model"])
