"""The chunked path never materialises [N, V] logits: every tensor created during forward + backward
(recorded by a TorchDispatchMode, views included) has fewer than N * V / 8 elements."""

import pytest
import torch

import rpg_kernels as rk
from tests.support import LargestAllocation

N, V, H = 4096, 32768, 64
LIMIT = N * V // 8


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) * 0.1
    targets = torch.randint(0, V, (N,), generator=gen)
    old = -torch.rand(N, generator=gen) * 5
    adv = torch.randn(N, generator=gen)
    mask = torch.rand(N, generator=gen) > 0.1
    return hidden, weight, targets, old, adv, mask


def test_recorder_sees_materialised_logits(problem):
    """The recorder would catch a [N, V] tensor (so the tests below can fail)."""
    hidden, weight = problem[0][:128], problem[1]
    with LargestAllocation() as rec:
        torch.log_softmax(hidden @ weight.T, dim=-1)
    assert rec.largest >= 128 * V


def test_fused_rpg_loss_workspace_does_not_grow_with_n_times_v(problem):
    hidden, weight, targets, old, adv, mask = problem
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with LargestAllocation() as rec:
        loss, _ = rk.fused_linear_rpg_loss(h, w, targets, old, adv, mask, entropy_coef=0.01, backend="torch")
        loss.backward()
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    assert rec.largest < LIMIT, f"{rec.op} produced {rec.largest} elements >= N*V/8 = {LIMIT}"


def test_fused_logprobs_backward_workspace_does_not_grow_with_n_times_v(problem):
    hidden, weight, targets = problem[:3]
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with LargestAllocation() as rec:
        logprobs, entropy = rk.fused_linear_logprobs(h, w, targets, return_entropy=True, backend="torch")
        forward_ops = rec.ops
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
    assert rec.ops > forward_ops + 10, "backward ran outside the recorder"
    assert rec.largest < LIMIT, f"{rec.op} produced {rec.largest} elements >= N*V/8 = {LIMIT}"
