"""Advantage estimators of docs/MATH.md §5 against plain Python loops."""

import statistics

import pytest
import torch

import rpg_kernels as rk

GROUP = 4


def rewards_of(num_prompts=3, seed=0):
    return torch.randn(
        num_prompts * GROUP, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def per_group(rewards, fn):
    out = []
    values = rewards.tolist()
    for start in range(0, len(values), GROUP):
        out += fn(values[start : start + GROUP])
    return torch.tensor(out, dtype=torch.float64)


def test_group_mean():
    r = rewards_of()
    expected = per_group(r, lambda g: [x - statistics.fmean(g) for x in g])
    torch.testing.assert_close(rk.group_mean_advantages(r, GROUP), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rk.compute_advantages("rpg", r, GROUP), expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rk.compute_advantages("dr_grpo", r, GROUP), expected, rtol=1e-13, atol=1e-14)


def test_group_normalized():
    r = rewards_of(seed=1)
    expected = per_group(r, lambda g: [(x - statistics.fmean(g)) / (statistics.stdev(g) + 1e-6) for x in g])
    torch.testing.assert_close(rk.group_normalized_advantages(r, GROUP), expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rk.compute_advantages("grpo", r, GROUP), expected, rtol=1e-13, atol=1e-14)
    # a group of equal rewards gives zeros, not NaN
    flat = torch.ones(GROUP, dtype=torch.float64)
    assert torch.equal(rk.group_normalized_advantages(flat, GROUP), torch.zeros(GROUP, dtype=torch.float64))


def test_rloo():
    r = rewards_of(seed=2)
    expected = per_group(r, lambda g: [x - (sum(g) - x) / (len(g) - 1) for x in g])
    torch.testing.assert_close(rk.rloo_advantages(r, GROUP), expected, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(rk.compute_advantages("rloo", r, GROUP), expected, rtol=1e-13, atol=1e-14)


def test_batch_mean():
    r = rewards_of(seed=3)
    expected = r - statistics.fmean(r.tolist())
    torch.testing.assert_close(rk.batch_mean_advantages(r), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(
        rk.compute_advantages("batch_mean", r, GROUP), expected, rtol=1e-14, atol=1e-14
    )


@pytest.mark.parametrize("kl_estimator", ["k1", "k2"])
@pytest.mark.parametrize("beta_kl", [0.0, 0.05])
def test_reinforce_pp(beta_kl, kl_estimator):
    gen = torch.Generator().manual_seed(4)
    batch, length = 4, 7
    rewards = torch.randn(batch, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[:, 0] = True
    mask[3] = False  # an empty sequence gets zeros and does not enter the whitening
    old = -torch.rand(batch, length, generator=gen, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    old_garbage = old.masked_fill(~mask, float("nan"))
    out = rk.reinforce_pp_advantages(
        rewards, mask, old_garbage, ref, beta_kl=beta_kl, kl_estimator=kl_estimator
    )

    returns = {}
    for b in range(batch):
        idx = [t for t in range(length) if mask[b, t]]
        token_rewards = []
        for t in idx:
            x = float(old[b, t] - ref[b, t])
            token_rewards.append(-beta_kl * (x if kl_estimator == "k1" else 0.5 * x * x))
        if idx:
            token_rewards[-1] += float(rewards[b])
        for j, t in enumerate(idx):
            returns[b, t] = sum(token_rewards[j:])
    values = list(returns.values())
    mean = statistics.fmean(values)
    std = statistics.pstdev(values)
    expected = torch.zeros(batch, length, dtype=torch.float64)
    for (b, t), g in returns.items():
        expected[b, t] = (g - mean) / (std + 1e-8)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    kwargs = dict(
        mask=mask, old_logprobs=old_garbage, ref_logprobs=ref, beta_kl=beta_kl, kl_estimator=kl_estimator
    )
    via_name = rk.compute_advantages("reinforce_pp", rewards, **kwargs)
    torch.testing.assert_close(via_name, out, rtol=0, atol=0)


def test_errors():
    r = rewards_of()
    with pytest.raises(ValueError, match="group_size"):
        rk.group_mean_advantages(r[:-1], GROUP)
    with pytest.raises(ValueError, match="group_size"):
        rk.group_mean_advantages(r, 0)
    with pytest.raises(ValueError, match="group_size"):
        rk.group_normalized_advantages(r, 1)
    with pytest.raises(ValueError, match="group_size"):
        rk.rloo_advantages(r, 1)
    with pytest.raises(TypeError, match="group_size"):
        rk.group_mean_advantages(r, 4.0)
    with pytest.raises(ValueError, match="rewards"):
        rk.group_mean_advantages(r.reshape(3, GROUP), GROUP)
    with pytest.raises(TypeError, match="rewards"):
        rk.group_mean_advantages(torch.ones(8, dtype=torch.long), GROUP)
    with pytest.raises(ValueError, match="rewards"):
        rk.group_mean_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), GROUP)
    with pytest.raises(ValueError, match="name"):
        rk.compute_advantages("ppo", r, GROUP)
    with pytest.raises(ValueError, match="mask"):
        rk.compute_advantages("reinforce_pp", r, GROUP)
    mask = torch.ones(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="rewards"):
        rk.reinforce_pp_advantages(torch.zeros(4), mask)
    with pytest.raises(ValueError, match="old_logprobs"):
        rk.reinforce_pp_advantages(torch.zeros(3), mask, beta_kl=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        rk.reinforce_pp_advantages(torch.zeros(3), mask, kl_estimator="k3")
    with pytest.raises(ValueError, match="ref_logprobs"):
        rk.reinforce_pp_advantages(torch.zeros(3), mask, torch.zeros(3, 5), torch.zeros(3, 4), beta_kl=0.1)
