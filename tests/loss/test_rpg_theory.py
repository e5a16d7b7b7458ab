"""The paper's central claim, exactly: on a toy categorical policy, the sampler-expectation of
each unclipped RPG loss has gradient -grad J(theta), J = E_theta[R] - beta * D(theta, ref).

Each outcome y is one "token": l = log pi_theta(y), l_old = log pi_old(y), l_ref = log pi_ref(y),
A = R(y). E_old[L] = sum_y pi_old(y) L(y). For ``rpg`` E_old[L] = -J (up to a constant); for
``rpg_reinforce`` the stop-gradient coefficient gives, through d l(y)/d theta, the score-function
form of the same gradient: sum_y pi_old(y) (w A + C) grad l = grad E_theta[R] - beta grad D.
Both are checked against D computed directly from its definition, by autograd, in float64.
"""

import zlib

import pytest
import torch

from rpg_kernels import LossConfig, rpg_loss
from rpg_kernels.config import KLS

K = 7
BETA = 0.35


def divergence(kl: str, pi: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Paper Table 1 on (possibly unnormalised) positive measures over the K outcomes."""
    if kl == "fkl":
        return (ref * (ref.log() - pi.log())).sum()
    if kl == "rkl":
        return (pi * (pi.log() - ref.log())).sum()
    if kl == "ufkl":
        return (ref * (ref.log() - pi.log()) - ref + pi).sum()
    return (pi * (pi.log() - ref.log()) - pi + ref).sum()


@pytest.mark.parametrize("measure", ["softmax", "unnormalised"])
@pytest.mark.parametrize("ref_is_old", [True, False], ids=["ref=old", "ref!=old"])
@pytest.mark.parametrize("style", ["rpg", "rpg_reinforce"])
@pytest.mark.parametrize("kl", KLS)
def test_expected_loss_gradient_is_minus_objective_gradient(kl, style, ref_is_old, measure):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kl}{style}{ref_is_old}{measure}".encode()))
    theta = torch.randn(K, generator=gen, dtype=torch.float64, requires_grad=True)
    old = torch.softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)  # the sampler
    if ref_is_old:
        ref = old
    else:
        ref = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
        ref = ref / ref.sum() if measure == "softmax" else ref
    rewards = torch.randn(K, generator=gen, dtype=torch.float64)

    log_pi = torch.log_softmax(theta, 0) if measure == "softmax" else theta
    cfg = LossConfig.preset(style, kl=kl, beta=BETA, clip_mode="none")
    expected_loss = torch.zeros((), dtype=torch.float64)
    for y in range(K):
        one_hot = torch.zeros(K, dtype=torch.bool)
        one_hot[y] = True
        loss_y, _ = rpg_loss(
            log_pi, old.log(), rewards, one_hot, None if ref_is_old else ref.log(), config=cfg
        )
        expected_loss = expected_loss + old[y] * loss_y
    (grad_loss,) = torch.autograd.grad(expected_loss, theta, retain_graph=True)

    pi = log_pi.exp()
    objective = (pi * rewards).sum() - BETA * divergence(kl, pi, ref)
    (grad_objective,) = torch.autograd.grad(objective, theta)

    assert grad_objective.norm() > 1e-3
    rel_err = (grad_loss + grad_objective).norm() / grad_objective.norm()
    assert rel_err < 1e-10, f"relative error {rel_err:.3e}"
    if style == "rpg":  # the surrogate itself is -J up to a theta-independent constant (Z_old dropped)
        with torch.no_grad():
            constant = expected_loss + objective
        theta2 = theta.detach() + 0.3
        log_pi2 = torch.log_softmax(theta2, 0) if measure == "softmax" else theta2
        loss2 = sum(
            old[y]
            * rpg_loss(
                log_pi2,
                old.log(),
                rewards,
                torch.arange(K) == y,
                None if ref_is_old else ref.log(),
                config=cfg,
            )[0]
            for y in range(K)
        )
        objective2 = (log_pi2.exp() * rewards).sum() - BETA * divergence(kl, log_pi2.exp(), ref)
        torch.testing.assert_close(loss2 + objective2, constant, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kl", KLS)
def test_clipping_changes_nothing_inside_the_trust_region(kl):
    """With pi_theta close to pi_old (all ratios inside the clip range) the clipped losses keep the
    exact gradient of the theorem, for both styles."""
    gen = torch.Generator().manual_seed(4)
    old_logits = torch.randn(K, generator=gen, dtype=torch.float64)
    theta = (old_logits + 0.01 * torch.randn(K, generator=gen, dtype=torch.float64)).requires_grad_(True)
    old = torch.softmax(old_logits, 0)
    rewards = torch.randn(K, generator=gen, dtype=torch.float64)
    grads = []
    for style in ("rpg", "rpg_reinforce"):
        for mode in ("none", "dual"):
            cfg = LossConfig.preset(style, kl=kl, beta=BETA, clip_mode=mode)
            log_pi = torch.log_softmax(theta, 0)
            total = sum(
                old[y] * rpg_loss(log_pi, old.log(), rewards, torch.arange(K) == y, config=cfg)[0]
                for y in range(K)
            )
            grads.append(torch.autograd.grad(total, theta)[0])
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0], rtol=1e-10, atol=1e-13)
