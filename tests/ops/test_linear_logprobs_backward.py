"""Triton backward kernels (interpreter on CPU) against float64 autograd through materialised logits."""

import pytest
import torch
from ops_reference import DEVICES, KERNEL_DTYPES, assert_close, make_problem, reference

from rpg_kernels.ops.linear_logprobs_backward import linear_logprobs_backward
from rpg_kernels.ops.linear_logprobs_forward import linear_logprobs_forward

# (seed, N, H, V): odd sizes around the interpreter tiles (32 x 64 x 32), N = 1, V = 1.
SHAPES = [
    (0, 1, 17, 5),
    (1, 37, 45, 301),
    (2, 70, 33, 199),
    (3, 96, 64, 128),
    (4, 9, 20, 1),
]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_backward(p, with_entropy_grad=True, deterministic=True, need=(True, True, True)):
    _, lse, entropy = linear_logprobs_forward(p.hidden, p.weight, p.bias, p.targets, p.temperature,
                                              with_entropy=with_entropy_grad)
    return linear_logprobs_backward(
        p.hidden, p.weight, p.bias, p.targets, lse, entropy, p.grad_logprob,
        p.grad_entropy if with_entropy_grad else None, p.temperature,
        need_hidden=need[0], need_weight=need[1], need_bias=need[2], deterministic=deterministic,
    )


def check_grads(p, grads, ref, tol):
    dh, dw, db = grads
    assert dh.dtype == p.hidden.dtype and dw.dtype == p.weight.dtype
    assert_close("dh", dh, ref["dh"], tol)
    assert_close("dw", dw, ref["dw"], tol)
    if p.bias is not None:
        assert db.dtype == p.bias.dtype
        assert_close("db", db, ref["db"], tol)
    else:
        assert db is None
    ignored = p.targets == -100
    assert (dh[ignored] == 0).all(), "ignored tokens must get no gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("seed,n,h,v", SHAPES)
def test_backward_matches_float64_reference(seed, n, h, v, dtype, device):
    p = make_problem(seed, n, h, v, dtype=dtype, device=device, bias=seed % 2 == 1,
                     temperature=0.6 + seed / 5)
    check_grads(p, run_backward(p), reference(p), GRAD_TOL[dtype])


@pytest.mark.parametrize("seed", range(3))
def test_backward_logprob_grad_only(seed):
    p = make_problem(30 + seed, 41, 24, 150 + seed, temperature=1.3)
    check_grads(p, run_backward(p, with_entropy_grad=False), reference(p, with_entropy_grad=False), 1e-5)


@pytest.mark.parametrize("seed", range(2))
def test_backward_atomic_variant(seed):
    p = make_problem(40 + seed, 45, 40, 201)
    check_grads(p, run_backward(p, deterministic=False), reference(p), 1e-5)


def test_backward_huge_logits_finite():
    p = make_problem(50, 40, 32, 150, logit_scale=500.0, temperature=1.0)
    ref = reference(p)
    assert ref["logit_max"] > 1000
    check_grads(p, run_backward(p), ref, 1e-4)


def test_backward_partial_needs():
    p = make_problem(60, 30, 20, 90)
    dh, dw, db = run_backward(p, need=(True, False, False))
    assert dw is None and db is None
    assert_close("dh", dh, reference(p)["dh"], 1e-5)
    dh, dw, db = run_backward(p, need=(False, True, True))
    assert dh is None
    assert_close("dw", dw, reference(p)["dw"], 1e-5)


def test_backward_deterministic_is_bitwise_reproducible():
    p = make_problem(70, 50, 36, 170)
    first, second = run_backward(p), run_backward(p)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
