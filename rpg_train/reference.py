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
from collections.abc import Callable
from typing import Any

import torch

REF_UPDATES = ("every_step", "every_k", "kl_threshold", "never")


class ReferencePolicy:
    """Owns the frozen reference model (if any) and the refresh rule.

    ``wrap`` turns the frozen copy of ``policy`` into the module the trainer computes log-probs with (a
    `rpg_train.logprobs.PolicyLoss`, sharded like the policy under FSDP); its parameters must come in the
    order of ``policy``'s. The frozen model's weights are checkpointed beside the policy's
    (`rpg_train.checkpoint`); ``state_dict`` holds the refresh rule's counters.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        mode: str = "every_step",
        every_k: int = 10,
        kl_threshold: float = 0.05,
        kl_ema: float = 0.9,
        *,
        wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda model: model,
    ) -> None:
        if mode not in REF_UPDATES:
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
            self.model = wrap(copy.deepcopy(policy).eval().requires_grad_(False))

    @property
    def is_old_policy(self) -> bool:
        """True when the reference equals the sampling policy (pass ``ref_logprobs=None``)."""
        return self.model is None

    @property
    def needs_kl(self) -> bool:
        """Whether `after_optimizer_step` reads its ``token_kl`` (a host sync the other rules skip)."""
        return self.mode == "kl_threshold"

    def after_optimizer_step(self, policy: torch.nn.Module, token_kl: float | None = None) -> bool:
        """Record one optimizer step (and its token KL, for ``kl_threshold``); refresh the reference if the
        rule says so by copying ``policy``'s parameters (shard by shard under FSDP).

        Returns True when the reference was refreshed.
        """
        self.steps_since_update += 1
        if self.needs_kl:
            if token_kl is None:
                raise ValueError("ref_update=kl_threshold needs the step's token_kl")
            self.kl_average = (
                token_kl
                if self.kl_average is None
                else (self.kl_ema * self.kl_average + (1.0 - self.kl_ema) * token_kl)
            )
        refresh = (self.mode == "every_k" and self.steps_since_update >= self.every_k) or (
            self.needs_kl and self.kl_average > self.kl_threshold
        )
        if refresh:
            with torch.no_grad():
                for frozen, live in zip(self.model.parameters(), policy.parameters(), strict=True):
                    frozen.copy_(live)
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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint's ref_update is {state['mode']!r}, this run's is {self.mode!r}")
        self.kl_average, self.steps_since_update = state["kl_average"], state["steps_since_update"]
        self.updates = state["updates"]
