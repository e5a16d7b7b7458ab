"""The chunked path never materialises [N, V] logits: every tensor created during forward + backward
(recorded by a TorchDispatchMode, views included) fits the stated workspace budget,
``TORCH_WORKSPACE_BYTES`` by default or the caller's ``workspace_bytes``, at sizes where ``[N, V]`` is
at least 8 times larger."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.ops.lm_head import TORCH_WORKSPACE_BYTES
from tests.support import LargestAllocation

N, V, H = 4096, 32768, 64
BUDGET = TORCH_WORKSPACE_BYTES  # bytes; the fp32 blocks' elements are a quarter of it


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


def test_the_budget_is_far_below_n_times_v():
    assert BUDGET <= N * V * 4 // 8 and V * H * 4 < BUDGET  # dW itself is allowed


@pytest.mark.parametrize("workspace_rows", [None, 128, 32])  # default; single pass; two vocabulary passes
def test_fused_rpg_loss_workspace_fits_the_budget(problem, workspace_rows):
    hidden, weight, targets, old, adv, mask = problem
    h_size = H if workspace_rows is None else 16  # dW [V, H] below the small budgets too
    h = hidden[:, :h_size].clone().requires_grad_()
    w = weight[:, :h_size].clone().requires_grad_()
    budget = BUDGET if workspace_rows is None else workspace_rows * V * 4
    with LargestAllocation() as rec:
        loss, _ = rk.fused_linear_rpg_loss(
            h,
            w,
            targets,
            old,
            adv,
            mask,
            entropy_coef=0.01,
            backend="torch",
            workspace_bytes=None if workspace_rows is None else budget,
        )
        loss.backward()
    assert h.grad is not None and w.grad is not None and torch.isfinite(w.grad).all()
    assert rec.largest_bytes <= budget, f"{rec.op} produced {rec.largest_bytes} bytes > {budget}"
    assert rec.largest_bytes >= budget // 2, "the budget was not used (larger blocks are faster)"


def test_fused_logprobs_backward_workspace_fits_the_budget(problem):
    hidden, weight, targets = problem[:3]
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with LargestAllocation() as rec:
        logprobs, entropy = rk.fused_linear_logprobs(h, w, targets, return_entropy=True, backend="torch")
        forward_ops = rec.ops
        (logprobs.sum() + 0.1 * entropy.sum()).backward()
    assert rec.ops > forward_ops + 10, "backward ran outside the recorder"
    assert rec.largest_bytes <= BUDGET, f"{rec.op} produced {rec.largest_bytes} bytes > {BUDGET}"
