"""Triton backward kernels (interpreter on CPU) against float64 autograd through materialised logits."""

import pytest
import torch

from rpg_kernels.ops import linear_logprobs_backward as backward
from rpg_kernels.ops.linear_logprobs_backward import linear_logprobs_backward
from rpg_kernels.ops.linear_logprobs_forward import linear_logprobs_forward
from tests.ops.ops_reference import (
    DEVICES,
    KERNEL_DTYPES,
    assert_close,
    head_of,
    make_problem,
    reference,
    upstream,
)

METHODS = ("rows", "atomic")  # deterministic=True, deterministic=False

# (seed, N, H, V): odd sizes around the interpreter tiles (32 x 64 x 32), N = 1, V = 1.
# The full shape sweep runs the deterministic kernels; the atomic one runs on a few shapes below.
SHAPES = [
    (0, 1, 17, 5),
    (1, 37, 45, 301),
    (2, 70, 33, 199),
    (3, 96, 64, 128),
    (4, 9, 20, 1),
]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def run_backward(p, with_entropy_grad=True, method="rows", need=(True, True, True)):
    _, lse, entropy = linear_logprobs_forward(head_of(p), with_entropy=with_entropy_grad)
    grads = linear_logprobs_backward(
        head_of(p), lse, entropy, upstream(p, with_entropy_grad), need, deterministic=method == "rows"
    )
    return grads.hidden, grads.weight, grads.bias


def check_grads(p, grads, ref, tol):
    dh, dw, db = grads
    expected = (
        torch.float32 if p.hidden.dtype == torch.float16 else p.hidden.dtype
    )  # fp16: fp32 until backward
    assert dh.dtype == expected and dw.dtype == expected
    assert_close("dh", dh, ref["dh"], tol)
    assert_close("dw", dw, ref["dw"], tol)
    if p.bias is not None:
        assert db.dtype == expected
        assert_close("db", db, ref["db"], tol)
    else:
        assert db is None
    ignored = p.targets == -100
    assert (dh[ignored] == 0).all(), "ignored tokens must get no gradient"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("seed,n,h,v", SHAPES)
def test_backward_matches_float64_reference(seed, n, h, v, dtype, device):
    p = make_problem(
        seed, n, h, v, dtype=dtype, device=device, bias=seed % 2 == 1, temperature=0.6 + seed / 5
    )
    check_grads(p, run_backward(p), reference(p), GRAD_TOL[dtype])


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


def test_backward_deterministic_is_bitwise_reproducible():
    p = make_problem(70, 50, 36, 170)
    first, second = run_backward(p), run_backward(p)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fp16_gradients_do_not_underflow(monkeypatch):
    """Token-mean weights ~1/N with p ~ 1/V put dz below fp16's smallest subnormal; the scaled kernels keep
    the grads (in fp32 until backward) within fp16 rounding of the float64 ones."""
    n, v = 256, 2048  # dz ~ 1e-3 / (N V) ~ 2e-9, below fp16's smallest subnormal (6e-8)
    p = make_problem(80, n, 16, v, dtype=torch.float16, bias=False, logit_scale=1.0, ignore_frac=0.0)
    p.grad_logprob.copy_(torch.rand(n, generator=torch.Generator().manual_seed(1)) * 1e-3 / n)
    p.grad_entropy.zero_()
    ref = reference(p, with_entropy_grad=False)
    # the rows of dW of words no token targets are made of the -g_l * p terms only
    never = torch.ones(v, dtype=torch.bool)
    never[p.targets] = False
    with monkeypatch.context() as m:  # guard: without the scale, fp16 dz underflows and those rows are 0
        m.setattr(backward, "fp16_dz_scale", lambda *args: 1.0)
        _, unscaled, _ = run_backward(p, with_entropy_grad=False)
        assert (unscaled[never] == 0).float().mean() > 0.8
    for method in METHODS:
        dh, dw, _ = run_backward(p, with_entropy_grad=False, method=method)
        assert dw.dtype == torch.float32
        assert_close(f"dw ({method})", dw, ref["dw"], 2e-2)
        assert_close(f"dw rows without a target ({method})", dw[never], ref["dw"][never], 2e-2)
        assert_close(f"dh ({method})", dh, ref["dh"], 2e-2)
