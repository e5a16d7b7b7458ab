"""Per-token loss values and d loss / d logprobs against the independent float64 reference."""

import math
import zlib

import numpy as np
import pytest
import torch

from rpg_kernels import LossConfig, rpg_loss
from rpg_kernels.config import KL_ESTIMATORS, KLS
from rpg_kernels.loss import loss_and_logprob_grads
from rpg_kernels.loss.token_losses import token_losses
from tests.loss.loss_reference import gspo_loss_and_grad, make_inputs, value_and_grad


def config_cases():
    cases = []
    for kl in KLS:
        for mode in ("none", "dual"):
            for beta in (1e-4, 0.3):
                cases.append(dict(algo="rpg", kl=kl, clip_mode=mode, beta=beta))
        for mode in ("none", "truncate", "dual"):
            for beta in (1e-4, 0.3):
                cases.append(dict(algo="rpg_reinforce", kl=kl, clip_mode=mode, beta=beta))
    for algo in ("grpo", "dapo", "dr_grpo", "reinforce_pp", "cispo", "gspo"):
        for est in (None,) + KL_ESTIMATORS:
            for mode in ("none", "dual"):
                overrides = dict(kl_estimator=est, clip_mode=mode, beta=0.2 if est else 0.0)
                if algo in ("grpo", "dapo") and mode == "dual":
                    overrides["clip_c"] = 3.0  # exercise the dual clip of the baselines too
                cases.append(dict(algo=algo, **overrides))
    return cases


def as_dict(cfg: LossConfig) -> dict:
    return dict(
        algo=cfg.algo,
        kl=cfg.kl,
        kl_estimator=cfg.kl_estimator,
        beta=cfg.beta,
        eps_low=cfg.eps_low,
        eps_high=cfg.eps_high,
        clip_c=cfg.clip_c,
        clip_mode=cfg.clip_mode,
        kl_clamp=cfg.kl_clamp,
    )


def case_id(case):
    return "-".join(f"{v}" for v in case.values())


@pytest.mark.parametrize("with_ref", [False, True], ids=["ref=old", "ref!=old"])
@pytest.mark.parametrize("case", config_cases(), ids=case_id)
def test_loss_and_grad_match_reference(case, with_ref):
    case = dict(case)
    algo = case.pop("algo")
    cfg = LossConfig.preset(algo, agg="token-mean", **case)
    seed = zlib.crc32(f"{algo}-{case_id(case)}-{with_ref}".encode())
    (lp, lo, lref, a, mask), t = make_inputs(seed, batch=5, length=13, with_ref=with_ref)
    logprobs = t["lp"].clone().requires_grad_(True)
    loss, metrics = rpg_loss(logprobs, t["lo"], t["a"], t["mask"], t["lref"], config=cfg)
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    n = mask.sum()
    if algo == "gspo":
        ref_loss, ref_grad = gspo_loss_and_grad(as_dict(cfg), lp, lo, lref, a, mask)
    else:
        values, grads = value_and_grad(as_dict(cfg), lp, lo, lref, a)
        ref_loss = values[mask].sum() / n
        ref_grad = np.where(mask, grads, 0.0) / n
        # per-token values, from the module that owns them, on clean (all masked-in) inputs
        full = torch.ones_like(t["mask"])
        clean = [torch.tensor(x) if x is not None else None for x in (lp, lo, a)]
        per_token = token_losses(
            clean[0], clean[1], clean[2], full, None if lref is None else torch.tensor(lref), cfg
        )
        np.testing.assert_allclose(per_token.loss.detach().numpy(), values, rtol=1e-12, atol=1e-12)
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-12, abs_tol=1e-12)
    np.testing.assert_allclose(logprobs.grad.numpy(), ref_grad, rtol=1e-11, atol=1e-14)
    assert not torch.isnan(logprobs.grad).any()
    # the fused kernels' entry point gives the same value and gradient
    value, grad, grad_entropy, _ = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
    assert grad_entropy is None and value.requires_grad is False
    torch.testing.assert_close(value, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad, logprobs.grad, rtol=0, atol=0)
    for key in (
        "kl",
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "clip_frac_dual",
        "ratio_mean",
        "ratio_max",
    ):
        assert torch.isfinite(torch.as_tensor(metrics[key])), key


def test_inputs_cover_every_zone():
    """Guard for the test above: the random inputs really visit every clip zone of both clip styles."""
    (lp, lo, lref, a, mask), _ = make_inputs(0, batch=5, length=13, with_ref=False)
    w = np.exp(lp - lo)
    assert ((a > 0) & (w > 1.28)).any() and ((a < 0) & (w < 0.8)).any() and ((a < 0) & (w > 10)).any()
    assert ((w > 1.2) & (w < 1.28)).any() and ((w > 0.8) & (w < 1.2)).any() and (a == 0).any()


@pytest.mark.parametrize("kl_clamp", [0.05, 0.5])
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize(
    "algo_mode",
    [
        ("rpg", "none"),
        ("rpg", "dual"),
        ("rpg_reinforce", "none"),
        ("rpg_reinforce", "dual"),
        ("grpo", "dual"),
    ],
)
def test_kl_clamp_matches_reference(algo_mode, kl, kl_clamp):
    algo, mode = algo_mode
    extra = dict(kl=kl) if algo != "grpo" else dict(kl_estimator={"fkl": "k1", "rkl": "k2"}.get(kl, "k3"))
    cfg = LossConfig.preset(algo, clip_mode=mode, beta=0.5, kl_clamp=kl_clamp, agg="token-mean", **extra)
    (lp, lo, lref, a, mask), t = make_inputs(7, batch=4, length=11, with_ref=True)
    value, grad, _, _ = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
    values, grads = value_and_grad(as_dict(cfg), lp, lo, lref, a)
    n = mask.sum()
    assert math.isclose(value.item(), values[mask].sum() / n, rel_tol=1e-12, abs_tol=1e-13)
    np.testing.assert_allclose(grad.numpy(), np.where(mask, grads, 0.0) / n, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("kl", KLS)
def test_rpg_unclipped_equals_rpg_reinforce_none(kl, with_ref):
    """docs/MATH.md §3: -(w*A + C) dl is the gradient of the rpg loss with clipping off, token for token."""
    _, t = make_inputs(11, batch=6, length=9, with_ref=with_ref)
    grads = []
    for algo in ("rpg", "rpg_reinforce"):
        cfg = LossConfig.preset(algo, kl=kl, clip_mode="none", beta=0.37)
        grads.append(loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-13, atol=1e-15)
    # rpg with clip bounds so wide that nothing is ever clipped is the same thing
    wide = LossConfig.preset("rpg", kl=kl, beta=0.37, eps_low=1 - 1e-9, eps_high=1e9, clip_c=math.inf)
    grad_wide = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], wide)[1]
    torch.testing.assert_close(grad_wide, grads[0], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("beta", [1e-4, 0.4])
def test_rpg_reinforce_dual_zones(kl, beta):
    """Inside a dual-clip zone the gradient is exactly 0 and the value -(w* A + C(w)) lp; outside it flows."""
    cfg = LossConfig.preset("rpg_reinforce", kl=kl, beta=beta, agg="token-mean")
    (lp, lo, lref, a, mask), t = make_inputs(3, batch=8, length=16, with_ref=True)
    _, grad, _, metrics = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
    w, k, lr = np.exp(lp - lo), np.exp(lref - lo), lp - lref
    c_of_w = {"fkl": beta * k, "rkl": -beta * w * (lr + 1), "ufkl": -beta * (w - k), "urkl": -beta * w * lr}[
        kl
    ]
    a_prime = a + c_of_w / w
    high = (a_prime >= 0) & (w >= 1.28)
    low = (a_prime < 0) & (w <= 0.8)
    dual = (a_prime < 0) & (w >= 10.0)
    clipped = (high | low | dual) & mask
    assert clipped.any() and (~clipped & mask).any() and (dual & mask).any()
    g = grad.numpy()
    assert (g[clipped] == 0.0).all()
    assert (g[~clipped & mask] != 0.0).all()
    assert (g[~mask] == 0.0).all()
    w_star = np.where(high, 1.28, np.where(low, 0.8, 10.0))
    expected = -(w_star * a + c_of_w) * lp
    full = torch.ones_like(t["mask"])
    per_token = token_losses(*(torch.tensor(x) for x in (lp, lo, a)), full, torch.tensor(lref), cfg).loss
    np.testing.assert_allclose(per_token.numpy()[clipped], expected[clipped], rtol=1e-12)
    n = mask.sum()
    assert math.isclose(float(metrics["clip_frac_low"]), (low & mask).sum() / n, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_frac_high"]), (high & mask).sum() / n, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_frac_dual"]), (dual & mask).sum() / n, rel_tol=1e-6)
    assert math.isclose(float(metrics["clip_frac"]), clipped.sum() / n, rel_tol=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_without_kl_is_ppo_clip(agg):
    """grpo with beta = 0 is PPO's clipped objective -min(w A, clip(w, 1-eps, 1+eps) A), aggregated."""
    _, t = make_inputs(5, batch=6, length=10, with_ref=False, garbage=False)
    cfg = LossConfig.preset("grpo", beta=0.0, agg=agg)
    logprobs = t["lp"].clone().requires_grad_(True)
    loss, _ = rpg_loss(logprobs, t["lo"], t["a"], t["mask"], config=cfg)
    (grad,) = torch.autograd.grad(loss, logprobs)

    x = t["lp"].clone().requires_grad_(True)
    w = torch.exp(x - t["lo"])
    ppo = -torch.min(w * t["a"], torch.clamp(w, 0.8, 1.2) * t["a"])
    m = t["mask"].double()
    if agg == "token-mean":
        expected = (ppo * m).sum() / m.sum()
    else:
        nonempty = m.sum(1) > 0  # make_inputs leaves one sequence empty: it does not count
        expected = ((ppo * m).sum(1)[nonempty] / m.sum(1)[nonempty]).mean()
    (expected_grad,) = torch.autograd.grad(expected, x)
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("clip_mode", ["none", "dual"])
def test_k3_is_equals_urkl(with_ref, clip_mode):
    """The importance-weighted k3 of the baselines is exactly the urkl regulariser of rpg."""
    _, t = make_inputs(9, batch=4, length=12, with_ref=with_ref)
    common = dict(beta=0.3, eps_low=0.2, eps_high=0.28, clip_c=10.0, clip_mode=clip_mode, agg="token-mean")
    grpo = LossConfig.preset("grpo", kl_estimator="k3_is", **common)
    rpg = LossConfig.preset("rpg", kl="urkl", **common)
    out_grpo = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], grpo)
    out_rpg = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], rpg)
    torch.testing.assert_close(out_grpo[0], out_rpg[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_grpo[1], out_rpg[1], rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(out_grpo[3]["kl"], out_rpg[3]["kl"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algo", ["rpg", "rpg_reinforce", "grpo", "gspo", "cispo"])
def test_low_precision_inputs_computed_in_fp32(dtype, algo):
    """Half-precision inputs are upcast: the loss is fp32, the gradient has the input's dtype, and both
    match the float64 computation on the same (rounded) inputs."""
    _, t = make_inputs(13, batch=3, length=7, with_ref=True)
    cfg = LossConfig.preset(algo, agg="token-mean")
    low = {k: None if v is None else v.to(dtype) for k, v in t.items() if k != "mask"}
    x = low["lp"].clone().requires_grad_(True)
    loss, _ = rpg_loss(x, low["lo"], low["a"], t["mask"], low["lref"], config=cfg)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    x64 = low["lp"].double().requires_grad_(True)
    loss64, _ = rpg_loss(x64, low["lo"].double(), low["a"].double(), t["mask"], low["lref"].double(), cfg)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol * 1e-2)


def test_flat_inputs_are_one_sequence():
    _, t = make_inputs(17, batch=1, length=23, with_ref=True)
    for algo in ("rpg_reinforce", "gspo", "grpo"):
        cfg = LossConfig.preset(algo)
        flat = loss_and_logprob_grads(t["lp"][0], t["lo"][0], t["a"][0], t["mask"][0], t["lref"][0], cfg)
        batched = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
        torch.testing.assert_close(flat[0], batched[0], rtol=0, atol=0)
        torch.testing.assert_close(flat[1], batched[1][0], rtol=0, atol=0)
        assert flat[1].shape == t["lp"][0].shape


def test_sequence_advantages_broadcast():
    _, t = make_inputs(19, batch=4, length=6, with_ref=False, garbage=False)
    seq_adv = t["a"][:, 0]
    cfg = LossConfig.preset("rpg_reinforce")
    per_seq = loss_and_logprob_grads(t["lp"], t["lo"], seq_adv, t["mask"], config=cfg)
    per_token = loss_and_logprob_grads(t["lp"], t["lo"], seq_adv[:, None].expand(4, 6), t["mask"], config=cfg)
    torch.testing.assert_close(per_seq[0], per_token[0], rtol=0, atol=0)
    torch.testing.assert_close(per_seq[1], per_token[1], rtol=0, atol=0)


def test_entropy_bonus():
    _, t = make_inputs(23, batch=3, length=8, with_ref=False)
    entropy = torch.rand(3, 8, dtype=torch.float64).masked_fill(~t["mask"], float("inf"))
    cfg = LossConfig.preset("rpg_reinforce", agg="seq-mean-token-mean")
    base, grad0, grad_e0, _ = loss_and_logprob_grads(t["lp"], t["lo"], t["a"], t["mask"], config=cfg)
    value, grad, grad_e, metrics = loss_and_logprob_grads(
        t["lp"], t["lo"], t["a"], t["mask"], config=cfg, entropy=entropy, entropy_coef=0.01
    )
    m = t["mask"].double()
    num_seqs = (m.sum(1) > 0).sum()  # the empty sequence does not count
    weights = m / m.sum(1, keepdim=True).clamp(min=1) / num_seqs
    clean_entropy = torch.where(t["mask"], entropy, 0.0)
    torch.testing.assert_close(value, base - 0.01 * (clean_entropy * weights).sum(), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, grad0, rtol=0, atol=0)
    torch.testing.assert_close(grad_e, -0.01 * weights, rtol=1e-13, atol=1e-16)
    torch.testing.assert_close(metrics["entropy"], (clean_entropy * m).sum().float() / m.sum().float())
    assert grad_e0 is None
