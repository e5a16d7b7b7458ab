"""`LossConfig`: which policy-gradient loss to compute, and its knobs (docs/MATH.md §2-4).

Two families share one dataclass:

* RPG (``algo`` in ``rpg``, ``rpg_reinforce``) choose the divergence with ``kl``
  (``fkl``, ``rkl``, ``ufkl``, ``urkl``); ``beta = 0`` switches the KL term off.
* Baselines (``grpo``, ``dapo``, ``dr_grpo``, ``reinforce_pp``, ``gspo``, ``cispo``) add
  ``beta * estimator`` with ``kl_estimator`` in ``k1``, ``k2``, ``k3``, ``k3_is``
  (``None``: no KL term in the loss).

``clip_mode`` per algo:

* ``"dual"``: the algo's own clipping. For the PPO-style algos (``rpg``, ``grpo``, ``dapo``,
  ``dr_grpo``, ``reinforce_pp``, ``gspo``) the dual-clip term ``DC(w, A)`` with ``clip_c``
  (``clip_c = inf``: plain PPO clipping); for ``rpg_reinforce`` the RPG-style clip (Alg. 2);
  for ``cispo`` the weight ``clip(w, 0, 1 + eps_high)``.
* ``"none"``: clipping off (``-A * w`` for the PPO-style algos, the bare Table-1/Table-2 losses
  for ``rpg``/``rpg_reinforce``, an unclipped weight for ``cispo``).
* ``"truncate"``: ``rpg_reinforce`` only (paper Remark F.2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

RPG_ALGOS = ("rpg", "rpg_reinforce")
BASELINE_ALGOS = ("grpo", "dapo", "dr_grpo", "reinforce_pp", "gspo", "cispo")
ALGOS = RPG_ALGOS + BASELINE_ALGOS
KLS = ("fkl", "rkl", "ufkl", "urkl")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3_is")
CLIP_MODES = ("none", "truncate", "dual")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
# Rollout (training-inference mismatch) correction, docs/MATH.md §9: TRL's four modes.
ROLLOUT_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# Where the fused losses run: "auto" is Triton for CUDA tensors, the chunked PyTorch path otherwise.
BACKENDS = ("auto", "triton", "torch")
# How the Triton backend computes the LM head: one cuBLAS pass per token chunk, or the fused Triton kernels.
METHODS = ("auto", "single_pass", "fused")

_INF = float("inf")

# docs/MATH.md §3: the paper's defaults for RPG, and the baselines' published settings.
_RPG_DEFAULTS = dict(
    kl="urkl", beta=1e-4, eps_low=0.2, eps_high=0.28, clip_c=10.0, clip_mode="dual", agg="token-mean"
)
_NO_KL_PPO = dict(
    kl_estimator=None, beta=0.0, eps_low=0.2, eps_high=0.2, clip_c=_INF, clip_mode="dual", agg="token-mean"
)
PRESETS: dict[str, dict[str, Any]] = {
    "rpg": {**_RPG_DEFAULTS},
    "rpg_reinforce": {**_RPG_DEFAULTS},
    "grpo": {**_NO_KL_PPO, "kl_estimator": "k3", "beta": 0.04, "agg": "seq-mean-token-mean"},
    "dapo": {**_NO_KL_PPO, "eps_high": 0.28},
    "dr_grpo": {**_NO_KL_PPO, "agg": "seq-mean-token-sum-norm"},
    "reinforce_pp": {**_NO_KL_PPO},
    "gspo": {**_NO_KL_PPO, "eps_low": 3e-4, "eps_high": 4e-4, "agg": "seq-mean-token-mean"},
    # CISPO (MiniMax-M1): the weight is clipped above only; eps_low=0.2 gives verl's two-sided variant.
    "cispo": {**_NO_KL_PPO, "eps_low": None, "eps_high": 0.28},
}


def _check_name(field: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"unknown {field}={value!r}; valid: {', '.join(valid)}")


def _check_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} must be a real number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{field} must not be NaN")
    return float(value)


@dataclass(frozen=True)
class LossConfig:
    """Configuration of `rpg_kernels.rpg_loss` and the fused losses (docs/MATH.md §2-4).

    Fields: ``algo`` (one of `ALGOS`); ``kl`` (RPG algos: one of `KLS`; ``None`` means ``urkl``);
    ``kl_estimator`` (baselines: one of `KL_ESTIMATORS` or ``None``); ``beta >= 0``;
    ``0 < eps_low < 1`` (``None``: no lower clip, ``cispo`` only); ``eps_high > 0``; ``clip_c > 1``
    (``inf`` allowed: no dual clip); ``clip_mode`` (one of `CLIP_MODES`, see the module docstring);
    ``agg`` (one of `AGGS`); ``kl_clamp`` (``None`` or ``> 0``: clamp the KL term's value to
    ``[-kl_clamp, kl_clamp]``); ``max_completion_length`` (``seq-mean-token-sum-norm`` only: Dr. GRPO's
    constant length ``L`` in ``sum(L * m) / (num_seqs * L)``; ``None``: the tensors' token dim);
    ``rollout_is`` (one of `ROLLOUT_IS_MODES` or ``None``) with ``rollout_is_min`` /
    ``rollout_is_max`` (``None``: unbounded on that side): the rollout importance correction of
    docs/MATH.md §9, applied when the loss is given ``rollout_logprobs``.
    The field defaults are the ``rpg`` preset.
    """

    algo: str = "rpg"
    kl: str | None = "urkl"
    kl_estimator: str | None = None
    beta: float = 1e-4
    eps_low: float = 0.2
    eps_high: float = 0.28
    clip_c: float = 10.0
    clip_mode: str = "dual"
    agg: str = "token-mean"
    kl_clamp: float | None = None
    max_completion_length: int | None = None
    rollout_is: str | None = None
    rollout_is_min: float | None = None
    rollout_is_max: float | None = 3.0

    def __post_init__(self) -> None:
        _check_name("algo", self.algo, ALGOS)
        if self.algo in RPG_ALGOS:
            if self.kl is None:
                object.__setattr__(self, "kl", "urkl")
            _check_name("kl", self.kl, KLS)
            if self.kl_estimator is not None:
                raise ValueError(
                    f"kl_estimator={self.kl_estimator!r} is for the baselines; algo={self.algo!r} "
                    f"chooses its divergence with kl ({', '.join(KLS)})"
                )
        else:
            if self.kl is not None:
                raise ValueError(
                    f"kl={self.kl!r} is for the RPG algos; algo={self.algo!r} uses kl_estimator "
                    f"({', '.join(KL_ESTIMATORS)}; k3_is equals the urkl regulariser)"
                )
            if self.kl_estimator is not None:
                _check_name("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        beta = _check_number("beta", self.beta)
        if beta < 0 or math.isinf(beta):
            raise ValueError(f"beta must be finite and >= 0, got {self.beta}")
        if self.eps_low is None:
            if self.algo != "cispo":
                raise ValueError(
                    f"eps_low=None (no lower clip) is defined for algo='cispo' only, not {self.algo!r}"
                )
            eps_low = None
        else:
            eps_low = _check_number("eps_low", self.eps_low)
            if not 0.0 < eps_low < 1.0:
                raise ValueError(f"eps_low must lie in (0, 1), got {self.eps_low}")
        eps_high = _check_number("eps_high", self.eps_high)
        if not 0.0 < eps_high < _INF:
            raise ValueError(f"eps_high must be finite and > 0, got {self.eps_high}")
        clip_c = _check_number("clip_c", self.clip_c)
        if not clip_c > 1.0:
            raise ValueError(f"clip_c must be > 1 (inf switches the dual clip off), got {self.clip_c}")
        _check_name("clip_mode", self.clip_mode, CLIP_MODES)
        if self.clip_mode == "truncate" and self.algo != "rpg_reinforce":
            raise ValueError(
                f"clip_mode='truncate' is defined for algo='rpg_reinforce' only, not {self.algo!r}"
            )
        _check_name("agg", self.agg, AGGS)
        if self.kl_clamp is not None:
            kl_clamp = _check_number("kl_clamp", self.kl_clamp)
            if not kl_clamp > 0:
                raise ValueError(f"kl_clamp must be None or > 0, got {self.kl_clamp}")
        if self.max_completion_length is not None:
            length = self.max_completion_length
            if isinstance(length, bool) or not isinstance(length, int) or length < 1:
                raise ValueError(f"max_completion_length must be None or an int >= 1, got {length!r}")
            if self.agg != "seq-mean-token-sum-norm":
                raise ValueError(
                    "max_completion_length is the constant of agg='seq-mean-token-sum-norm' (Dr. GRPO); "
                    f"agg={self.agg!r} does not use it"
                )
        self._check_rollout_correction()
        for field, value in (
            ("beta", beta),
            ("eps_low", eps_low),
            ("eps_high", eps_high),
            ("clip_c", clip_c),
        ):
            object.__setattr__(self, field, value)

    def _check_rollout_correction(self) -> None:
        bounds = {}
        for field in ("rollout_is_min", "rollout_is_max"):
            value = getattr(self, field)
            if value is not None:
                value = _check_number(field, value)
                if not 0.0 <= value < _INF:
                    raise ValueError(f"{field} must be None or a finite number >= 0, got {value}")
                object.__setattr__(self, field, value)
            bounds[field] = value
        if self.rollout_is is None:
            return
        _check_name("rollout_is", self.rollout_is, ROLLOUT_IS_MODES)
        low, high = bounds["rollout_is_min"], bounds["rollout_is_max"]
        if low is not None and high is not None and not low < high:
            raise ValueError(f"rollout_is_min ({low}) must be < rollout_is_max ({high})")
        if self.rollout_is.endswith("truncate") and low is None and high is None:
            raise ValueError(f"rollout_is={self.rollout_is!r} needs rollout_is_min or rollout_is_max")

    @property
    def is_rpg(self) -> bool:
        """True for ``rpg`` and ``rpg_reinforce`` (divergence chosen by ``kl``)."""
        return self.algo in RPG_ALGOS

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LossConfig:
        """The preset ``name`` of docs/MATH.md §3 with any field overridden (``preset("grpo", beta=0.0)``)."""
        _check_name("preset", name, tuple(PRESETS))
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown LossConfig field(s) {sorted(unknown)} in overrides")
        fields: dict[str, Any] = dict(algo=name, kl=None, kl_estimator=None)
        fields.update(PRESETS[name])
        fields.update(overrides)
        return cls(**fields)

    def replace(self, **changes: Any) -> LossConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def resolve_loss_config(config: LossConfig | None) -> LossConfig:
    """``config``, or the default (``rpg`` preset) for ``None``; a ``TypeError`` for anything else."""
    if config is None:
        return LossConfig()
    if not isinstance(config, LossConfig):
        raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
    return config
