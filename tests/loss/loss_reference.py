"""An independent float64 NumPy implementation of docs/MATH.md §2-3, per token, and the tests' random inputs.

Written from the formulas of docs/MATH.md (max/min for the dual clip, the tables for Omega, dOmega/dl, C
and the estimators); it shares no code with `rpg_kernels`. ``value_and_grad`` returns the per-token
loss ``L`` and ``dL/dl`` for the token-level algos; ``gspo_loss_and_grad`` the token-mean
aggregated GSPO loss and its gradient (its ratio couples the tokens of a sequence).
"""

from __future__ import annotations

import numpy as np
import torch

OMEGA = {
    "fkl": lambda w, lr, k: -k * lr,
    "rkl": lambda w, lr, k: w * lr,
    "ufkl": lambda w, lr, k: w - k - k * lr,
    "urkl": lambda w, lr, k: w * lr - w + k,
}
D_OMEGA = {  # dOmega/dl
    "fkl": lambda w, lr, k: -k * np.ones_like(w),
    "rkl": lambda w, lr, k: w * (lr + 1),
    "ufkl": lambda w, lr, k: w - k,
    "urkl": lambda w, lr, k: w * lr,
}
C_COEF = {  # C(w) / beta, docs/MATH.md §3 table
    "fkl": lambda w, lr, k: k * np.ones_like(w),
    "rkl": lambda w, lr, k: -w * (lr + 1),
    "ufkl": lambda w, lr, k: -(w - k),
    "urkl": lambda w, lr, k: -w * lr,
}


def estimator(name, w, lr):
    """(value, d/dl) of k1, k2, k3, k3_is on rho = exp(lr)."""
    rho = np.exp(lr)
    k3 = 1 / rho - 1 + lr
    dk3 = 1 - 1 / rho
    return {
        "k1": (lr, np.ones_like(lr)),
        "k2": (0.5 * lr**2, lr),
        "k3": (k3, dk3),
        "k3_is": (w * k3, w * k3 + w * dk3),
    }[name]


def dual_clip_and_grad_w(w, a, eps_low, eps_high, c):
    """DC(w, A) with max/min, and dDC/dw (-A where the unclipped branch wins, else 0)."""
    p1 = -a * w
    p2 = -a * np.clip(w, 1 - eps_low, 1 + eps_high)
    pc = np.maximum(p1, p2)
    with np.errstate(invalid="ignore"):  # -inf * 0 where c = inf and A = 0 (not selected)
        pc = np.where(a < 0, np.minimum(pc, -c * a), pc)
    grad = np.where(pc == p1, -a, 0.0)
    return pc, grad


def _clamp(value, grad, kl_clamp):
    if kl_clamp is None:
        return value, grad
    inside = np.abs(value) <= kl_clamp
    return np.clip(value, -kl_clamp, kl_clamp), np.where(inside, grad, 0.0)


def value_and_grad(cfg: dict, lp, lo, lref, a):
    """Per-token (L, dL/dl) in float64 for a token-level algo. ``cfg`` is a plain dict of the knobs."""
    lp, lo, a = (np.asarray(x, dtype=np.float64) for x in (lp, lo, a))
    d = lp - lo
    w = np.exp(d)
    if lref is None:
        lr, k = d, 1.0
    else:
        lref = np.asarray(lref, dtype=np.float64)
        lr, k = lp - lref, np.exp(lref - lo)
    algo, beta, mode = cfg["algo"], cfg["beta"], cfg["clip_mode"]
    el, eh, c, clamp = cfg["eps_low"], cfg["eps_high"], cfg["clip_c"], cfg.get("kl_clamp")

    if algo == "rpg":
        om, dom = _clamp(OMEGA[cfg["kl"]](w, lr, k), D_OMEGA[cfg["kl"]](w, lr, k), clamp)
        if mode == "none":
            pol, dpol_dw = -a * w, -a
        else:
            pol, dpol_dw = dual_clip_and_grad_w(w, a, el, eh, c)
        return pol + beta * om, dpol_dw * w + beta * dom

    if algo == "rpg_reinforce":
        kl = cfg["kl"]

        def coef_c(ww, llr):
            # C = beta * C_COEF = -beta * dOmega/dl, zero where kl_clamp cuts Omega
            cc = beta * C_COEF[kl](ww, llr, k)
            if clamp is None:
                return cc
            return np.where(np.abs(OMEGA[kl](ww, llr, k)) <= clamp, cc, 0.0)

        if mode == "none":
            coef = w * a + coef_c(w, lr)
            return -coef * lp, -coef
        if mode == "truncate":
            wc = np.clip(w, 1 - el, 1 + eh)
            coef = wc * a + coef_c(wc, lr + np.log(wc) - np.log(w))
            return -coef * lp, -coef
        cw = coef_c(w, lr)
        a_prime = a + cw / w
        pos = a_prime >= 0
        flow = np.where(pos, w < 1 + eh, (w > 1 - el) & (w < c))
        w_star = np.where(pos, 1 + eh, np.where(w <= 1 - el, 1 - el, c))
        coef = np.where(flow, w * a + cw, w_star * a + cw)
        return -coef * lp, np.where(flow, -coef, 0.0)

    if cfg["kl_estimator"] is not None:
        kv, dk = _clamp(*estimator(cfg["kl_estimator"], w, lr), clamp)
        kv, dk = beta * kv, beta * dk
    else:
        kv, dk = 0.0, 0.0
    if algo == "cispo":
        weight = np.minimum(w, 1 + eh) if mode == "dual" else w
        return -weight * a * lp + kv, -weight * a + dk
    assert algo in ("grpo", "dapo", "dr_grpo", "reinforce_pp")
    if mode == "none":
        pol, dpol_dw = -a * w, -a
    else:
        pol, dpol_dw = dual_clip_and_grad_w(w, a, el, eh, c)
    return pol + kv, dpol_dw * w + dk


def gspo_loss_and_grad(cfg: dict, lp, lo, lref, a, mask):
    """Token-mean aggregated GSPO loss and d loss / d lp, all ``[B, T]`` float64 (mask 0/1)."""
    lp, lo, a, m = (np.asarray(x, dtype=np.float64) for x in (lp, lo, a, mask))
    n = m.sum()
    loss, grad = 0.0, np.zeros_like(lp)
    for b in range(lp.shape[0]):
        idx = np.nonzero(m[b])[0]
        if len(idx) == 0:
            continue
        s = np.exp(np.mean(lp[b, idx] - lo[b, idx]))
        s_vec = np.full(len(idx), s)
        if cfg["clip_mode"] == "none":
            pol, dpol_ds = -a[b, idx] * s_vec, -a[b, idx]
        else:
            pol, dpol_ds = dual_clip_and_grad_w(
                s_vec, a[b, idx], cfg["eps_low"], cfg["eps_high"], cfg["clip_c"]
            )
        loss += pol.sum() / n
        grad[b, idx] += dpol_ds.sum() * s / len(idx) / n
        if cfg["kl_estimator"] is not None:
            d = lp[b, idx] - lo[b, idx]
            lr = d if lref is None else lp[b, idx] - np.asarray(lref, dtype=np.float64)[b, idx]
            kv, dk = _clamp(*estimator(cfg["kl_estimator"], np.exp(d), lr), cfg.get("kl_clamp"))
            loss += cfg["beta"] * kv.sum() / n
            grad[b, idx] += cfg["beta"] * dk / n
    return loss, grad


# Ratio centres away from every clip boundary (0.72, 0.8, 1.2, 1.28, c = 3 or 10): each zone is hit.
RATIO_CENTRES = np.array([0.3, 0.6, 0.76, 0.9, 1.1, 1.24, 1.6, 5.0, 15.0, 40.0])


def make_inputs(seed: int, batch: int, length: int, with_ref: bool, garbage: bool = True):
    """Fresh random float64 inputs covering all clip zones and A > 0, A < 0, A = 0."""
    gen = np.random.default_rng(seed)
    shape = (batch, length)
    lp = -gen.uniform(0.05, 4.0, shape)
    log_ratio = np.log(gen.choice(RATIO_CENTRES, shape)) + 0.005 * gen.standard_normal(shape)
    lo = lp - log_ratio
    lref = lo + 0.7 * gen.standard_normal(shape) if with_ref else None
    a = gen.choice([-2.0, -0.5, 0.0, 0.7, 1.5], shape) * gen.uniform(0.5, 1.5, shape)
    mask = gen.uniform(size=shape) < 0.75
    mask[0, 0] = True
    if batch > 2:  # one sequence with a single token, one with none
        mask[1] = False
        mask[1, length // 2] = True
        mask[2] = False
    t = {k: None if v is None else torch.tensor(v) for k, v in dict(lp=lp, lo=lo, lref=lref, a=a).items()}
    t["mask"] = torch.tensor(mask)
    if garbage:  # masked-out tokens may hold anything
        for key in ("lp", "lo", "lref", "a"):
            if t[key] is not None:
                t[key] = t[key].masked_fill(~t["mask"], float("nan"))
    return (lp, lo, lref, a, mask), t


def token_level_cases() -> list[tuple[str, dict]]:
    """Every token-level algo x kl (or estimator) x clip mode, CISPO's lower clip, the other presets."""
    import itertools

    from rpg_kernels.config import KL_ESTIMATORS, KLS

    cases = [("rpg", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "dual")]
    cases += [("rpg_reinforce", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "truncate", "dual")]
    for algo in ("grpo", "cispo"):
        for est, mode in itertools.product((None,) + KL_ESTIMATORS, ("none", "dual")):
            cases.append((algo, dict(kl_estimator=est, clip_mode=mode)))
    cases.append(("cispo", dict(eps_low=0.2)))
    cases += [(algo, {}) for algo in ("dapo", "dr_grpo", "reinforce_pp")]
    return cases


def case_id(case: tuple[str, dict]) -> str:
    return "-".join([case[0]] + [str(v) for v in case[1].values()])
