"""Per-token losses of docs/MATH.md §2-3 in PyTorch, differentiable in the log-probs.

All functions take 2-D ``[B, T]`` tensors that are already validated, cast to the compute dtype
(fp32 or fp64) and sanitised (masked-out entries replaced by zeros), as `rpg_kernels.loss.rpg_loss`
prepares them. Notation as in docs/MATH.md §1: ``l`` current log-probs, ``l_old`` sampler log-probs,
``l_ref`` reference log-probs, ``w = exp(l - l_old)``, ``rho = exp(l - l_ref)``,
``kappa = exp(l_ref - l_old)``.

Clip zones (boolean, per token) are the tokens whose gradient the clipping zeroes:
``low`` (ratio under ``1 - eps_low`` with a negative advantage), ``high`` (over ``1 + eps_high``
with a positive advantage), ``dual`` (over ``clip_c`` with a negative advantage). For
``rpg_reinforce`` the sign is that of ``A' = A + C(w)/w``. For ``truncate`` and ``cispo``,
whose gradient never stops, ``low``/``high`` flag the tokens whose weight was truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig

__all__ = [
    "TokenLosses",
    "token_losses",
    "kl_regulariser",
    "kl_coefficient",
    "kl_coefficient_over_ratio",
    "kl_estimate",
    "dual_clip",
]


@dataclass
class TokenLosses:
    """Per-token results, all ``[B, T]``: ``loss`` is differentiable; the rest are detached."""

    loss: Tensor
    kl: Tensor  # the KL term's per-token value without beta (Omega, or the estimator); metrics only
    ratio: Tensor  # w (gspo: the sequence ratio, broadcast over the sequence)
    clip_low: Tensor
    clip_high: Tensor
    clip_dual: Tensor


def kl_regulariser(kl: str, w: Tensor, log_rho: Tensor, kappa: Tensor | float) -> Tensor:
    """Omega of docs/MATH.md §2 (table 1): the per-token value whose sampler-expectation is the divergence."""
    if kl == "fkl":
        return -kappa * log_rho
    if kl == "rkl":
        return w * log_rho
    if kl == "ufkl":
        return w - kappa - kappa * log_rho
    if kl == "urkl":
        return w * log_rho - w + kappa
    raise ValueError(f"unknown kl={kl!r}")


def kl_coefficient(kl: str, w: Tensor, log_rho: Tensor, kappa: Tensor | float, beta: float) -> Tensor:
    """C(w) of docs/MATH.md §3 (rpg_reinforce): ``-beta * dOmega/dl``, so that ``-(w*A + C)`` is dL/dl."""
    if kl == "fkl":
        return beta * kappa * torch.ones_like(w)
    if kl == "rkl":
        return -beta * w * (log_rho + 1.0)
    if kl == "ufkl":
        return -beta * (w - kappa)
    if kl == "urkl":
        return -beta * w * log_rho
    raise ValueError(f"unknown kl={kl!r}")


def kl_estimate(estimator: str, w: Tensor, log_rho: Tensor) -> Tensor:
    """The baselines' KL estimators on ``rho`` (docs/MATH.md §2): k1, k2, k3 and ``k3_is = w * k3``."""
    if estimator == "k1":
        return log_rho
    if estimator == "k2":
        return 0.5 * log_rho.square()
    k3 = torch.exp(-log_rho) - 1.0 + log_rho
    if estimator == "k3":
        return k3
    if estimator == "k3_is":
        return w * k3
    raise ValueError(f"unknown kl_estimator={estimator!r}")


def dual_clip(
    w: Tensor, advantages: Tensor, eps_low: float, eps_high: float, clip_c: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``DC(w, A)`` of docs/MATH.md §3 and its zones ``(value, low, high, dual)``.

    Written with explicit zones (not max/min) so that the gradient is ``-A`` exactly where no
    clip is active and exactly zero inside a zone.
    """
    positive, negative = advantages > 0, advantages < 0
    high = positive & (w > 1.0 + eps_high)
    low = negative & (w < 1.0 - eps_low)
    dual = negative & (w > clip_c)
    value = -advantages * w
    value = torch.where(dual, -clip_c * advantages, value)
    value = torch.where(low, -(1.0 - eps_low) * advantages, value)
    value = torch.where(high, -(1.0 + eps_high) * advantages, value)
    return value, low, high, dual


def _clamp_kl(omega: Tensor, kl_clamp: float | None) -> Tensor:
    return omega if kl_clamp is None else omega.clamp(-kl_clamp, kl_clamp)


def _no_clip(w: Tensor) -> Tensor:
    return torch.zeros_like(w, dtype=torch.bool)


def token_losses(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None,
    config: LossConfig,
    rollout_weight: Tensor | None = None,
) -> TokenLosses:
    """Per-token loss ``L`` for ``config.algo`` (docs/MATH.md §3), before aggregation.

    ``logprobs, old_logprobs, advantages, ref_logprobs``: ``[B, T]`` in the compute dtype, zeros on
    masked-out tokens; ``ref_logprobs=None`` means ref = old (``kappa = 1``). ``mask``: bool ``[B, T]``
    (used only by ``gspo``'s sequence ratio). ``rollout_weight``: the constant rollout importance weight
    of docs/MATH.md §9 (``[B, T]`` or ``[B, 1]``), multiplying the whole per-token loss of the RPG algos
    and the policy term of the baselines; ``None`` = 1.
    """
    cfg = config
    log_ratio = logprobs - old_logprobs
    w = torch.exp(log_ratio)
    if ref_logprobs is None:
        log_rho, kappa = log_ratio, 1.0
    else:
        log_rho, kappa = logprobs - ref_logprobs, torch.exp(ref_logprobs - old_logprobs)

    if cfg.algo == "rpg":
        omega = _clamp_kl(kl_regulariser(cfg.kl, w, log_rho, kappa), cfg.kl_clamp)
        if cfg.clip_mode == "none":
            policy, low, high, dual = -advantages * w, _no_clip(w), _no_clip(w), _no_clip(w)
        else:
            policy, low, high, dual = dual_clip(w, advantages, cfg.eps_low, cfg.eps_high, cfg.clip_c)
        loss = policy + cfg.beta * omega
        if rollout_weight is not None:  # the RPG losses are expectations under the sampler: all of it
            loss = rollout_weight * loss
        return TokenLosses(loss, omega.detach(), w.detach(), low, high, dual)

    if cfg.algo == "rpg_reinforce":
        out = _rpg_reinforce(
            logprobs, w.detach(), log_rho.detach(), log_ratio.detach(), kappa, advantages, cfg
        )
        if rollout_weight is not None:
            out.loss = rollout_weight * out.loss
        return out

    # Baselines: an optional KL estimator (beta * k) on top of the policy term.
    if cfg.kl_estimator is not None:
        kl_term = _clamp_kl(kl_estimate(cfg.kl_estimator, w, log_rho), cfg.kl_clamp)
        kl_value = kl_term.detach()
    else:
        kl_term = None
        with torch.no_grad():  # monitored only: k3, GRPO's estimate of KL(theta || ref)
            kl_value = kl_estimate("k3", w, log_rho)

    if cfg.algo == "cispo":  # -SG(clip(w, 1 - eps_low, 1 + eps_high)) * A * l; eps_low None: no lower clip
        with torch.no_grad():
            clipped = cfg.clip_mode == "dual"
            high = w > 1.0 + cfg.eps_high if clipped else _no_clip(w)
            low = w < 1.0 - cfg.eps_low if clipped and cfg.eps_low is not None else _no_clip(w)
            weight = torch.where(high, torch.full_like(w, 1.0 + cfg.eps_high), w)
            if cfg.eps_low is not None:
                weight = torch.where(low, torch.full_like(w, 1.0 - cfg.eps_low), weight)
        policy, dual, ratio = -weight * advantages * logprobs, _no_clip(w), w.detach()
    else:
        if cfg.algo == "gspo":  # sequence ratio exp(mean_t(l - l_old)) over each sequence's masked tokens
            tokens = mask.sum(dim=-1, keepdim=True).clamp(min=1)
            seq_log_ratio = (log_ratio * mask).sum(dim=-1, keepdim=True) / tokens
            ratio = torch.exp(seq_log_ratio).expand_as(w)
        else:
            ratio = w
        if cfg.clip_mode == "none":
            policy, low, high, dual = -advantages * ratio, _no_clip(w), _no_clip(w), _no_clip(w)
        else:
            policy, low, high, dual = dual_clip(ratio, advantages, cfg.eps_low, cfg.eps_high, cfg.clip_c)
        ratio = ratio.detach()

    if rollout_weight is not None:  # the baselines' convention (TRL, verl): the policy term only
        policy = rollout_weight * policy
    loss = policy if kl_term is None else policy + cfg.beta * kl_term
    return TokenLosses(loss, kl_value, ratio, low, high, dual)


@torch.no_grad()
def _rpg_coefficient(
    kl: str, w: Tensor, log_rho: Tensor, kappa: Tensor | float, advantages: Tensor, cfg: LossConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``(w*A + C(w), C(w), Omega, inside)``: C is zeroed where ``kl_clamp`` cuts Omega (its gradient is
    0 there); ``inside`` marks the tokens it does not cut (None without a clamp)."""
    coef_kl = kl_coefficient(kl, w, log_rho, kappa, cfg.beta)
    omega = kl_regulariser(kl, w, log_rho, kappa)
    inside = None
    if cfg.kl_clamp is not None:
        inside = omega.abs() <= cfg.kl_clamp
        coef_kl = torch.where(inside, coef_kl, torch.zeros_like(coef_kl))
        omega = omega.clamp(-cfg.kl_clamp, cfg.kl_clamp)
    return w * advantages + coef_kl, coef_kl, omega, inside


def kl_coefficient_over_ratio(kl: str, log_rho: Tensor, beta: float) -> Tensor:
    """``C(w) / w`` in closed form (``kappa / w = 1 / rho``): finite even where ``w`` underflows to 0."""
    if kl == "fkl":
        return beta * torch.exp(-log_rho)
    if kl == "rkl":
        return -beta * (log_rho + 1.0)
    if kl == "ufkl":
        return -beta * (1.0 - torch.exp(-log_rho))
    if kl == "urkl":
        return -beta * log_rho
    raise ValueError(f"unknown kl={kl!r}")


def _rpg_reinforce(
    logprobs: Tensor,
    w: Tensor,
    log_rho: Tensor,
    log_ratio: Tensor,
    kappa: Tensor | float,
    advantages: Tensor,
    cfg: LossConfig,
) -> TokenLosses:
    """REINFORCE-style RPG (docs/MATH.md §3): ``L = -SG(w*A + C(w)) * l``, clip modes none/truncate/dual."""
    if cfg.clip_mode == "none":
        coef, _, omega, _ = _rpg_coefficient(cfg.kl, w, log_rho, kappa, advantages, cfg)
        return TokenLosses(-coef * logprobs, omega, w, _no_clip(w), _no_clip(w), _no_clip(w))

    if cfg.clip_mode == "truncate":  # Remark F.2: w -> clip(w) inside SG, log(rho) shifted to match
        with torch.no_grad():
            w_trunc = w.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
            log_rho_trunc = log_rho + torch.log(w_trunc) - log_ratio
            low, high = w < 1.0 - cfg.eps_low, w > 1.0 + cfg.eps_high
        coef, _, omega, _ = _rpg_coefficient(cfg.kl, w_trunc, log_rho_trunc, kappa, advantages, cfg)
        return TokenLosses(-coef * logprobs, omega, w, low, high, _no_clip(w))

    # dual: RPG-style clip (Alg. 2), branching on the sign of A' = A + C(w)/w.
    with torch.no_grad():
        coef, coef_kl, omega, inside = _rpg_coefficient(cfg.kl, w, log_rho, kappa, advantages, cfg)
        coef_kl_over_w = kl_coefficient_over_ratio(cfg.kl, log_rho, cfg.beta)
        if inside is not None:
            coef_kl_over_w = torch.where(inside, coef_kl_over_w, torch.zeros_like(coef_kl_over_w))
        positive = advantages + coef_kl_over_w >= 0
        high = positive & (w >= 1.0 + cfg.eps_high)
        low = ~positive & (w <= 1.0 - cfg.eps_low)
        dual = ~positive & (w >= cfg.clip_c)
        flows = ~(high | low | dual)
        w_star = torch.full_like(w, cfg.clip_c)
        w_star = torch.where(low, torch.full_like(w, 1.0 - cfg.eps_low), w_star)
        w_star = torch.where(high, torch.full_like(w, 1.0 + cfg.eps_high), w_star)
        coef = torch.where(flows, coef, w_star * advantages + coef_kl)
    loss = -coef * torch.where(flows, logprobs, logprobs.detach())
    return TokenLosses(loss, omega, w, low, high, dual)
