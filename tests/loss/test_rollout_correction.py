"""The rollout importance correction (docs/MATH.md §9) against float64 statements, and what it multiplies;
the porting gaps: the public per-token loss, Dr. GRPO's constant length, CISPO's lower clip."""

import math

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.config import ROLLOUT_IS_MODES
from rpg_kernels.loss.rollout_correction import rollout_mismatch_metrics, rollout_weights

B, T = 4, 6


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3 - 0.2
    rollout = old + 0.4 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    logprobs = old + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = torch.rand(B, T, generator=gen) > 0.2
    mask[0, 0] = True
    rollout[0, 0] = float("nan")  # an unscored token
    rollout[~mask] = float("nan")  # masked-out garbage
    return logprobs, old, rollout, adv, mask


def expected_weights(old, rollout, mask, mode, low, high):
    """The definition, element by element in plain Python floats."""
    out = []
    for b in range(B):
        diffs = []
        for t in range(T):
            d = float(old[b, t] - rollout[b, t]) if mask[b, t] else 0.0
            diffs.append(0.0 if math.isnan(d) else d)
        ratios = [math.exp(sum(diffs))] * T if mode.startswith("sequence") else [math.exp(d) for d in diffs]
        row = []
        for r in ratios:
            if mode.endswith("truncate"):
                r = min(r, high) if high is not None else r
                r = max(r, low) if low is not None else r
            elif (low is not None and r < low) or (high is not None and r > high):
                r = 0.0
            row.append(r)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ROLLOUT_IS_MODES)
@pytest.mark.parametrize("low,high", [(None, 3.0), (0.7, 1.3), (0.5, None)])
def test_weights_follow_the_definition(mode, low, high):
    logprobs, old, rollout, adv, mask = batch(1)
    cfg = rk.LossConfig(rollout_is=mode, rollout_is_min=low, rollout_is_max=high)
    got = rollout_weights(old, rollout, mask, cfg).expand(B, T)
    torch.testing.assert_close(got, expected_weights(old, rollout, mask, mode, low, high), rtol=1e-12, atol=0)
    if mode.startswith("token"):
        assert (got[~mask] == 1.0).all() and got[0, 0] == 1.0  # masked and unscored tokens: ratio 1


def rollout_cases():
    return [
        ("rpg", {}),
        ("rpg_reinforce", {}),
        ("rpg_reinforce", dict(clip_mode="none")),
        ("grpo", {}),
        ("cispo", {}),
        ("gspo", {}),
        ("dapo", dict(kl_estimator="k3_is", beta=0.1)),
    ]


@pytest.mark.parametrize("algo,overrides", rollout_cases())
def test_which_terms_the_weight_multiplies(algo, overrides):
    """RPG algos: the whole per-token loss; baselines: the policy term only (TRL's and verl's convention)."""
    logprobs, old, rollout, adv, mask = batch(2)
    beta = {"rpg": 0.3, "rpg_reinforce": 0.3}.get(algo, overrides.pop("beta", 0.2 if algo == "grpo" else 0.0))
    cfg = rk.LossConfig.preset(algo, beta=beta, **overrides).replace(
        rollout_is="token_truncate", rollout_is_max=2.0
    )
    weights = rollout_weights(old, rollout, mask, cfg)
    lp = logprobs.clone().requires_grad_(True)
    loss, _ = rk.rpg_loss(lp, old, adv, mask, config=cfg, rollout_logprobs=rollout)
    (grad,) = torch.autograd.grad(loss, lp)
    # the same loss written out: the weighted policy term and the (un)weighted KL term, from the
    # unweighted per-token losses with beta = 0 and with the KL term alone
    plain = cfg.replace(rollout_is=None)
    policy_only = plain.replace(beta=0.0)
    lp2 = logprobs.clone().requires_grad_(True)
    total = rk.per_token_loss(lp2, old, adv, mask, config=plain).loss
    policy = rk.per_token_loss(lp2, old, adv, mask, config=policy_only).loss
    kl = total - policy
    kl_weight = weights if cfg.is_rpg else torch.ones_like(weights)
    expected = rk.aggregate(weights * policy + kl_weight * kl, mask, cfg.agg)
    (expected_grad,) = torch.autograd.grad(expected, lp2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(loss, rk.rpg_loss(logprobs, old, adv, mask, config=plain)[0])


def test_rollout_weights_argument_equals_rollout_logprobs():
    logprobs, old, rollout, adv, mask = batch(3)
    cfg = rk.LossConfig.preset("rpg_reinforce", rollout_is="sequence_mask", rollout_is_max=1.5)
    a, _ = rk.rpg_loss(logprobs, old, adv, mask, config=cfg, rollout_logprobs=rollout)
    w = rollout_weights(old, rollout, mask, cfg)
    b, _ = rk.rpg_loss(logprobs, old, adv, mask, config=cfg.replace(rollout_is=None), rollout_weights=w[:, 0])
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "path",
    [
        dict(backend="torch"),
        dict(backend="triton", method="single_pass"),
        dict(backend="triton", method="fused"),
    ],
)
def test_fused_loss_applies_the_correction(path):
    gen = torch.Generator().manual_seed(4)
    n, h, v = 2 * T, 16, 53
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.4
    targets = torch.randint(0, v, (n,), generator=gen)
    with torch.no_grad():
        current = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    old = current + 0.2 * torch.randn(n, generator=gen)
    rollout = old + 0.3 * torch.randn(n, generator=gen)
    adv, mask = torch.randn(n, generator=gen), torch.rand(n, generator=gen) > 0.2
    for algo in ("rpg_reinforce", "grpo"):
        cfg = rk.LossConfig.preset(algo, rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.25)
        hg = hidden.clone().requires_grad_(True)
        loss, _ = rk.fused_linear_rpg_loss(
            hg, weight, targets, old, adv, mask, config=cfg, rollout_logprobs=rollout, **path
        )
        loss.backward()
        hr = hidden.clone().requires_grad_(True)
        logprobs = torch.log_softmax(hr @ weight.T, -1).gather(1, targets[:, None])[:, 0]
        expected, _ = rk.rpg_loss(logprobs, old, adv, mask, config=cfg, rollout_logprobs=rollout)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(hg.grad, hr.grad, rtol=1e-4, atol=1e-7)


def test_configuration_and_input_errors_name_the_argument():
    logprobs, old, rollout, adv, mask = batch(5)
    with pytest.raises(ValueError, match="rollout_is"):
        rk.LossConfig(rollout_is="geometric")
    with pytest.raises(ValueError, match="rollout_is_min"):
        rk.LossConfig(rollout_is="token_mask", rollout_is_min=2.0, rollout_is_max=1.0)
    with pytest.raises(ValueError, match="rollout_is_max"):
        rk.LossConfig(rollout_is="token_truncate", rollout_is_max=float("inf"))
    with pytest.raises(ValueError, match="needs rollout_is_min or rollout_is_max"):
        rk.LossConfig(rollout_is="token_truncate", rollout_is_max=None)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        rk.rpg_loss(logprobs, old, adv, mask, rollout_logprobs=rollout)  # no mode in the config
    with pytest.raises(ValueError, match="rollout_logprobs"):
        rk.rpg_loss(logprobs, old, adv, mask, config=rk.LossConfig(rollout_is="token_mask"))  # no log-probs
    with pytest.raises(ValueError, match="rollout_logprobs and rollout_weights"):
        cfg = rk.LossConfig(rollout_is="token_mask")
        rk.rpg_loss(
            logprobs, old, adv, mask, config=cfg, rollout_logprobs=rollout, rollout_weights=torch.ones(B)
        )
    with pytest.raises(ValueError, match="rollout_weights"):
        rk.rpg_loss(logprobs, old, adv, mask, rollout_weights=-torch.ones(B, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="rollout_weights"):
        rk.rpg_loss(logprobs, old, adv, mask, rollout_weights=torch.ones(B + 1))


def test_mismatch_metrics():
    logprobs, old, rollout, adv, mask = batch(6)
    cfg = rk.LossConfig(rollout_is="token_mask", rollout_is_min=0.8, rollout_is_max=1.25)
    metrics = rollout_mismatch_metrics(old, rollout, mask, cfg)
    scored = mask & ~torch.isnan(rollout)
    d = (old - rollout)[scored]
    torch.testing.assert_close(
        metrics["mismatch_kl"].double(), (torch.expm1(d) - d).mean(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(metrics["mismatch_abs_max"].double(), d.abs().max(), rtol=1e-6, atol=0)
    outside = ((torch.exp(d) < 0.8) | (torch.exp(d) > 1.25)).sum() / mask.sum()
    torch.testing.assert_close(metrics["rollout_outside_frac"].double(), outside.double(), rtol=1e-6, atol=0)


# ---- the porting gaps ----


@pytest.mark.parametrize("algo", ["rpg", "rpg_reinforce", "grpo", "dr_grpo", "cispo", "gspo"])
def test_per_token_loss_aggregates_to_rpg_loss(algo):
    logprobs, old, _, adv, mask = batch(7)
    cfg = rk.LossConfig.preset(algo)
    lp = logprobs.clone().requires_grad_(True)
    out = rk.per_token_loss(lp, old, adv, mask, config=cfg)
    assert out.loss.shape == (B, T) and (out.loss[~mask] == 0).all()
    aggregated = rk.aggregate(out.loss, mask, cfg.agg, num_items=3)
    expected, _ = rk.rpg_loss(logprobs, old, adv, mask, config=cfg, num_items=3)
    torch.testing.assert_close(aggregated, expected, rtol=1e-12, atol=1e-14)
    assert aggregated.requires_grad


def test_dr_grpo_constant_length():
    """Dr. GRPO divides by num_seqs * the generation budget, whatever the batch's width."""
    logprobs, old, _, adv, mask = batch(8)
    cfg = rk.LossConfig.preset("dr_grpo", max_completion_length=16)
    loss, _ = rk.rpg_loss(logprobs, old, adv, mask, config=cfg)
    per_token = rk.per_token_loss(logprobs, old, adv, mask, config=cfg).loss
    sequences = (mask.sum(-1) > 0).sum()
    torch.testing.assert_close(loss, per_token.sum() / (sequences * 16), rtol=1e-12, atol=0)
    wider = [torch.cat([t, torch.zeros(B, 3, dtype=t.dtype)], 1) for t in (logprobs, old)]
    wide_mask = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], 1)
    loss_wide, _ = rk.rpg_loss(*wider, adv, wide_mask, config=cfg)
    torch.testing.assert_close(loss_wide, loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="max_completion_length"):
        rk.LossConfig.preset("dapo", max_completion_length=16)


def test_cispo_lower_clip():
    """eps_low=None (the preset: MiniMax, TRL, Liger) has no lower clip; eps_low set clips below (verl)."""
    ratio = torch.tensor([[0.5, 0.9, 1.1, 1.5]], dtype=torch.float64)
    old = torch.full_like(ratio, -1.0)
    logprobs = (old + ratio.log()).requires_grad_(True)
    adv, mask = torch.ones(1, dtype=torch.float64), torch.ones_like(ratio, dtype=torch.bool)
    for eps_low, expected_weight in ((None, [0.5, 0.9, 1.1, 1.28]), (0.2, [0.8, 0.9, 1.1, 1.28])):
        cfg = rk.LossConfig.preset("cispo", eps_low=eps_low, agg="seq-mean-token-sum")
        loss, metrics = rk.rpg_loss(logprobs, old, adv, mask, config=cfg)
        (grad,) = torch.autograd.grad(loss, logprobs)
        torch.testing.assert_close(grad, -torch.tensor([expected_weight], dtype=torch.float64))
        assert float(metrics["clip_frac_low"]) == (0.25 if eps_low else 0.0)
    with pytest.raises(ValueError, match="eps_low"):
        rk.LossConfig.preset("grpo", eps_low=None)
