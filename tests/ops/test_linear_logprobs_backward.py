"""Triton backward kernels (interpreter on CPU) against float64 autograd through materialised logits."""

import pytest
import torch

from rpg_kernels.ops.linear_logprobs_backward import METHODS, linear_logprobs_backward
from rpg_kernels.ops.linear_logprobs_forward import linear_logprobs_forward
from tests.ops.ops_reference import DEVICES, KERNEL_DTYPES, assert_close, make_problem, reference

# (seed, N, H, V): odd sizes around the interpreter tiles (32 x 64 x 32), N = 1, V = 1.
# The full shape sweep runs the default method; every method runs on a few shapes below.
SHAPES = [
    (0, 1, 17, 5),
    (1, 37, 45, 301),
    (2, 70, 33, 199),
    (3, 96, 64, 128),
    (4, 9, 20, 1),
]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_backward(p, with_entropy_grad=True, method=None, need=(True, True, True), dz_elements=1 << 28):
    _, lse, entropy = linear_logprobs_forward(
        p.hidden, p.weight, p.bias, p.targets, p.temperature, with_entropy=with_entropy_grad
    )
    return linear_logprobs_backward(
        p.hidden,
        p.weight,
        p.bias,
        p.targets,
        lse,
        entropy,
        p.grad_logprob,
        p.grad_entropy if with_entropy_grad else None,
        p.temperature,
        need_hidden=need[0],
        need_weight=need[1],
        need_bias=need[2],
        method=method,
        dz_elements=dz_elements,
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
    """Default method ("gemm"), with a dz workspace of ~3 rows of V: several token chunks."""
    p = make_problem(
        seed, n, h, v, dtype=dtype, device=device, bias=seed % 2 == 1, temperature=0.6 + seed / 5
    )
    check_grads(p, run_backward(p, dz_elements=3 * v + 1), reference(p), GRAD_TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES[:2], ids=str)
@pytest.mark.parametrize("seed", range(2))
def test_backward_methods(seed, dtype, method):
    p = make_problem(40 + seed, 45, 40, 201, dtype=dtype, bias=seed == 0)
    check_grads(p, run_backward(p, method=method), reference(p), GRAD_TOL[dtype])


@pytest.mark.parametrize("method", METHODS)
def test_backward_logprob_grad_only(method):
    p = make_problem(30 + len(method), 41, 24, 150 + len(method), temperature=1.3)
    check_grads(
        p,
        run_backward(p, with_entropy_grad=False, method=method),
        reference(p, with_entropy_grad=False),
        1e-5,
    )


def test_backward_huge_logits_finite():
    p = make_problem(50, 40, 32, 150, logit_scale=500.0, temperature=1.0)
    ref = reference(p)
    assert ref["logit_max"] > 1000
    check_grads(p, run_backward(p), ref, 1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_backward_partial_needs(method):
    p = make_problem(60, 30, 20, 90)
    ref = reference(p)
    dh, dw, db = run_backward(p, need=(True, False, False), method=method)
    assert dw is None and db is None
    assert_close("dh", dh, ref["dh"], 1e-5)
    dh, dw, db = run_backward(p, need=(False, True, True), method=method)
    assert dh is None
    assert_close("dw", dw, ref["dw"], 1e-5)
    assert_close("db", db, ref["db"], 1e-5)


@pytest.mark.parametrize("method", ["gemm", "rows"])
def test_backward_deterministic_is_bitwise_reproducible(method):
    p = make_problem(70, 50, 36, 170)
    first, second = run_backward(p, method=method), run_backward(p, method=method)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_unknown_method():
    with pytest.raises(ValueError, match="method"):
        run_backward(make_problem(0, 3, 4, 5), method="fast")
