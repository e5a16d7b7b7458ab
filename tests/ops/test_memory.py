"""The chunked path never materialises [N, V] logits: every tensor created during forward + backward
(recorded by a TorchDispatchMode, views included) has fewer than N * V / 8 elements."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import rpg_kernels as rk

N, V, H = 4096, 32768, 64
LIMIT = N * V // 8


class RecordOutputSizes(TorchDispatchMode):
    """Records ``(op name, numel)`` of every tensor any ATen op returns inside the context."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.sizes.append((str(func), t.numel()))
        return out

    def largest(self) -> tuple[str, int]:
        return max(self.sizes, key=lambda s: s[1])


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
    with RecordOutputSizes() as rec:
        torch.log_softmax(hidden @ weight.T, dim=-1)
    assert rec.largest()[1] >= 128 * V


def test_fused_rpg_loss_workspace_does_not_grow_with_n_times_v(problem):
    hidden, weight, targets, old, adv, mask = problem
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with RecordOutputSizes() as rec:
        loss, _ = rk.fused_linear_rpg_loss(h, w, targets, old, adv, mask, entropy_coef=0.01, backend="torch")
        loss.backward()
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    op, size = rec.largest()
    assert size < LIMIT, f"{op} produced {size} elements >= N*V/8 = {LIMIT}"


def test_fused_logprobs_backward_workspace_does_not_grow_with_n_times_v(problem):
    hidden, weight, targets = problem[:3]
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with RecordOutputSizes() as rec:
        logprobs, entropy = rk.fused_linear_logprobs(h, w, targets, return_entropy=True, backend="torch")
        forward_ops = len(rec.sizes)
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
    assert len(rec.sizes) > forward_ops + 10, "backward ran outside the recorder"
    op, size = rec.largest()
    assert size < LIMIT, f"{op} produced {size} elements >= N*V/8 = {LIMIT}"
