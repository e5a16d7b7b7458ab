"""docs/MATH.md §7 bad inputs raise ValueError/TypeError naming the argument; all-zero masks are harmless."""

import pytest
import torch

from rpg_kernels import LossConfig, rpg_loss
from rpg_kernels.checks import (
    check_finite_masked,
    check_finite_masked_all,
    check_float_dtype,
    check_int_dtype,
    check_same_device,
    check_shape,
    check_targets_in_range,
)
from rpg_kernels.config import ALGOS
from rpg_kernels.loss import loss_and_logprob_grads

B, T = 3, 5


def good_inputs():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(B, T, generator=gen) * 2
    return dict(
        logprobs=logprobs,
        old_logprobs=logprobs + 0.1 * torch.randn(B, T, generator=gen),
        advantages=torch.randn(B, generator=gen),
        mask=torch.ones(B, T, dtype=torch.bool),
        ref_logprobs=logprobs + 0.1 * torch.randn(B, T, generator=gen),
    )


def with_(**changes):
    inputs = good_inputs()
    inputs.update(changes)
    return inputs


def nan_at_first(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


BAD = [
    (dict(old_logprobs=torch.zeros(B, T + 1)), ValueError, "old_logprobs"),
    (dict(ref_logprobs=torch.zeros(B + 1, T)), ValueError, "ref_logprobs"),
    (dict(mask=torch.ones(B, T - 1)), ValueError, "mask"),
    (dict(advantages=torch.zeros(B + 1)), ValueError, "advantages"),
    (dict(advantages=torch.zeros(B, T + 2)), ValueError, "advantages"),
    (dict(logprobs=torch.zeros(B, T, 2)), ValueError, "logprobs"),
    (dict(logprobs=torch.zeros(B, T, dtype=torch.long)), TypeError, "logprobs"),
    (dict(old_logprobs=torch.zeros(B, T, dtype=torch.int32)), TypeError, "old_logprobs"),
    (dict(advantages=torch.ones(B, dtype=torch.long)), TypeError, "advantages"),
    (dict(ref_logprobs=torch.zeros(B, T, dtype=torch.bool)), TypeError, "ref_logprobs"),
    (dict(logprobs=[[0.0] * T] * B), TypeError, "logprobs"),
    (dict(old_logprobs=torch.zeros(B, T, device="meta")), ValueError, "old_logprobs"),
    (dict(mask=torch.ones(B, T, device="meta")), ValueError, "mask"),
    (dict(advantages=nan_at_first(torch.zeros(B))), ValueError, "advantages"),
    (dict(advantages=torch.full((B, T), float("inf"))), ValueError, "advantages"),
    (dict(old_logprobs=nan_at_first(torch.zeros(B, T))), ValueError, "old_logprobs"),
    (dict(ref_logprobs=nan_at_first(torch.zeros(B, T))), ValueError, "ref_logprobs"),
]


@pytest.mark.parametrize("changes, error, name", BAD, ids=[f"{n}-{i}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_tensor_inputs(changes, error, name):
    with pytest.raises(error, match=name):
        rpg_loss(**with_(**changes))
    with pytest.raises(error, match=name):
        loss_and_logprob_grads(**with_(**changes))


def test_entropy_checked():
    with pytest.raises(ValueError, match="entropy"):
        rpg_loss(**good_inputs(), entropy=torch.zeros(B, T + 1))
    with pytest.raises(TypeError, match="entropy"):
        rpg_loss(**good_inputs(), entropy=torch.zeros(B, T, dtype=torch.long))


@pytest.mark.parametrize(
    "num_items, error",
    [(-1, ValueError), (float("nan"), ValueError), ("3", TypeError), (torch.ones(2), ValueError)],
)
def test_bad_num_items(num_items, error):
    with pytest.raises(error, match="num_items"):
        rpg_loss(**good_inputs(), num_items=num_items)


def test_bad_config():
    with pytest.raises(TypeError, match="config"):
        rpg_loss(**good_inputs(), config="rpg")


def test_non_finite_values_on_masked_out_tokens_are_allowed():
    inputs = good_inputs()
    inputs["mask"] = torch.ones(B, T, dtype=torch.bool)
    inputs["mask"][0, 0] = False
    for key in ("old_logprobs", "ref_logprobs", "logprobs"):
        inputs[key] = nan_at_first(inputs[key])
    inputs["advantages"] = inputs["advantages"][:, None].expand(B, T).contiguous()
    inputs["advantages"][0, 0] = float("-inf")
    loss, grad, _, metrics = loss_and_logprob_grads(**inputs)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[0, 0] == 0
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_all_zero_mask_gives_zero_loss_and_zero_grad(algo, agg):
    inputs = good_inputs()
    inputs["mask"] = torch.zeros(B, T)
    for key in ("logprobs", "old_logprobs", "ref_logprobs"):
        inputs[key] = torch.full((B, T), float("nan"))
    logprobs = inputs.pop("logprobs").requires_grad_(True)
    entropy = torch.full((B, T), float("inf"), requires_grad=True)
    cfg = LossConfig.preset(algo, agg=agg)
    loss, metrics = rpg_loss(logprobs, **inputs, config=cfg, entropy=entropy, entropy_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logprobs.grad, torch.zeros(B, T)) and torch.equal(entropy.grad, torch.zeros(B, T))
    assert all(float(v) == 0.0 for v in metrics.values())


def test_generic_checkers():
    x = torch.zeros(2, 3)
    check_shape("x", x, (2, 3))
    with pytest.raises(ValueError, match="hidden"):
        check_shape("hidden", x, (2, 4))
    with pytest.raises(TypeError, match="weight"):
        check_float_dtype("weight", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="targets"):
        check_int_dtype("targets", x)
    with pytest.raises(ValueError, match="bias"):
        check_same_device(hidden=x, weight=x, bias=torch.zeros(3, device="meta"))
    check_same_device(hidden=x, bias=None)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    check_finite_masked("old", torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]]), mask)
    with pytest.raises(ValueError, match="old"):
        check_finite_masked("old", torch.tensor([[0.0, 0.0, 0.0], [float("inf"), 0.0, 0.0]]), mask)
    targets = torch.tensor([0, 4, -100, 2])
    check_targets_in_range("targets", targets, 5)
    for bad in (torch.tensor([0, 5]), torch.tensor([-1, 0]), torch.tensor([-100, 7])):
        with pytest.raises(ValueError, match="targets"):
            check_targets_in_range("targets", bad, 5)
    with pytest.raises(ValueError, match="targets"):
        check_targets_in_range("targets", targets, 5, ignore_index=None)
    nan_second = torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])
    check_finite_masked_all(mask, old=nan_second, ref=None, adv=torch.zeros(2, 1))
    with pytest.raises(ValueError, match="adv"):
        check_finite_masked_all(mask, old=nan_second, adv=torch.tensor([[0.0], [float("-inf")]]))
    with pytest.raises(ValueError, match="old"):
        check_finite_masked_all(None, old=nan_second)
