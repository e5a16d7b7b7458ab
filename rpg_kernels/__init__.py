"""rpg-kernels: fused kernels for the RPG family of KL-regularised policy-gradient losses.

Public API (docs/MATH.md §7)::

    import rpg_kernels as rk
    cfg = rk.LossConfig.preset("rpg_reinforce", kl="urkl")
    loss, metrics = rk.rpg_loss(logprobs, old_logprobs, advantages, mask, config=cfg)
    loss, metrics = rk.fused_linear_rpg_loss(hidden, weight, targets, old_logprobs, advantages, mask,
                                             config=cfg)

Names are imported lazily so that ``import rpg_kernels`` does not import Triton.
"""

from importlib import import_module
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "LossConfig": "rpg_kernels.config",
    "rpg_loss": "rpg_kernels.loss",
    "per_token_loss": "rpg_kernels.loss",
    "aggregate": "rpg_kernels.loss",
    "rollout_weights": "rpg_kernels.loss",
    "rollout_mismatch_metrics": "rpg_kernels.loss",
    "fused_linear_logprobs": "rpg_kernels.fused",
    "fused_linear_rpg_loss": "rpg_kernels.fused",
    "RPGLoss": "rpg_kernels.module",
    "compute_advantages": "rpg_kernels.advantages",
    "group_mean_advantages": "rpg_kernels.advantages",
    "group_normalized_advantages": "rpg_kernels.advantages",
    "rloo_advantages": "rpg_kernels.advantages",
    "batch_mean_advantages": "rpg_kernels.advantages",
    "reinforce_pp_advantages": "rpg_kernels.advantages",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rpg_kernels' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
