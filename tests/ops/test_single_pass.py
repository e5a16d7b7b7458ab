"""The single pass on the Triton backend (interpreter on CPU): log-probs to fp32 accuracy, gradients against
float64, chunking by the workspace budget, and no allocation beyond that budget."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.ops import logit_rows
from rpg_kernels.ops.dispatch import triton_interpreter_enabled
from rpg_kernels.ops.lm_head import HeadOptions
from rpg_kernels.ops.single_pass import chunk_rows, single_pass_backward, single_pass_logprobs
from tests.ops.ops_reference import (
    DEVICES,
    KERNEL_DTYPES,
    assert_close,
    head_of,
    make_problem,
    reference,
    upstream,
)
from tests.support import LargestAllocation

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()),
    reason="needs CUDA or the Triton interpreter",
)
DEVICE = DEVICES[0]
# (seed, N, H, V, rows per chunk): N = 1, V below a block, odd sizes; one chunk or several.
SHAPES = [(0, 1, 17, 5, 4), (1, 37, 45, 301, 8), (2, 64, 32, 64, 64), (3, 100, 33, 257, 7), (4, 9, 20, 1, 2)]
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def options(rows, vocab, dtype):
    """Options whose workspace holds ``rows`` rows of the fp32 chunk (and its 16-bit dz)."""
    per_row = vocab * (4 + (0 if dtype == torch.float32 else 2))
    return HeadOptions(backend="triton", workspace_bytes=rows * per_row)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("seed,n,h,v,rows", SHAPES)
def test_single_pass_matches_float64(seed, n, h, v, rows, dtype):
    p = make_problem(
        seed, n, h, v, dtype=dtype, device=DEVICE, bias=seed % 2 == 0, temperature=0.5 + seed / 9
    )
    ref = reference(p)
    opts = options(rows, v, dtype)
    assert chunk_rows(n, v, dtype, opts.workspace_bytes) == min(n, rows)
    out = single_pass_logprobs(head_of(p), opts)
    scale = ref["logit_max"].item()
    assert_close("logprob", out.logprob, ref["logprob"], 1e-5, scale=scale)
    assert_close("entropy", out.entropy, ref["entropy"], 1e-5)
    grads = single_pass_backward(head_of(p), out.lse, out.entropy, upstream(p), opts)
    tol = GRAD_TOL[dtype]
    assert_close("dh", grads.hidden, ref["dh"], tol)
    assert_close("dw", grads.weight, ref["dw"], tol)
    assert grads.weight.dtype == torch.float32  # the in-place fp32 accumulator
    if p.bias is not None:
        assert_close("db", grads.bias, ref["db"], tol)
    assert (grads.hidden[p.targets == -100] == 0).all()


@pytest.mark.parametrize("logit_scale", [10.0, 30.0])
def test_log_probs_have_fp32_accuracy_not_16_bit(logit_scale):
    """fp16 inputs, |logits| ~ 10-30: the fp32 chunk keeps every log-prob to fp32 accuracy (a 16-bit chunk
    would round each logit by ~|z| * 2^-11, i.e. ~1e-2 here), and the fused kernels agree."""
    p = make_problem(
        11, 80, 64, 500, dtype=torch.float16, device=DEVICE, logit_scale=logit_scale, temperature=1.0
    )
    ref = reference(p)
    assert ref["logit_max"] > logit_scale
    single = rk.fused_linear_logprobs(p.hidden, p.weight, p.targets, bias=p.bias, backend="triton")
    fused = rk.fused_linear_logprobs(
        p.hidden, p.weight, p.targets, bias=p.bias, backend="triton", method="fused"
    )
    bound = 4 * ref["logit_max"].item() * 2.0**-24 * 64  # fp32 rounding of a 64-term dot product, generous
    for name, logprob in (("single pass", single), ("fused", fused)):
        err = (logprob.double() - ref["logprob"]).abs().max().item()
        assert err < bound < ref["logit_max"].item() * 2.0**-11, f"{name}: {err:.3g}"


def test_chunking_does_not_change_the_result():
    p = make_problem(12, 70, 24, 131, device=DEVICE, bias=True)
    args = (p.hidden, p.weight, p.targets, -torch.rand(70) * 4, torch.randn(70), torch.rand(70) > 0.3)
    results = []
    for budget in (131 * 4 * 3, 1 << 30):  # 3 rows per chunk, one chunk
        h = p.hidden.clone().requires_grad_()
        loss, _ = rk.fused_linear_rpg_loss(
            h, *args[1:], bias=p.bias, backend="triton", workspace_bytes=budget
        )
        loss.backward()
        results.append((loss, h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-9)


def test_workspace_bounds_every_allocation(monkeypatch):
    """Allocation recorder: nothing the single pass allocates is larger than its workspace budget (the fp32
    chunk), far below N x V; the recorder sees a materialised [N, V] (so the check can fail)."""
    monkeypatch.setattr(logit_rows, "INTERPRETER_BLOCK_V", 1024)  # larger blocks: the interpreter is slow
    n, h, v = 512, 16, 4096
    gen = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(n, h, generator=gen), torch.randn(v, h, generator=gen) * 0.2
    targets = torch.randint(0, v, (n,), generator=gen)
    old, adv, mask = (
        -torch.rand(n, generator=gen) * 5,
        torch.randn(n, generator=gen),
        torch.rand(n, generator=gen) > 0.1,
    )
    budget = 16 * v * 4  # 16 rows of the fp32 chunk: 256 KiB
    with LargestAllocation() as rec:
        torch.log_softmax(hidden[:64] @ weight.T, dim=-1)
    assert rec.largest >= 64 * v
    hg, wg = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with LargestAllocation() as rec:
        loss, _ = rk.fused_linear_rpg_loss(
            hg, wg, targets, old, adv, mask, entropy_coef=0.01, backend="triton", workspace_bytes=budget
        )
        loss.backward()
    assert torch.isfinite(wg.grad).all() and wg.grad.abs().sum() > 0
    assert budget < n * v * 4 // 8  # (the interpreter views each launch's storage as bytes: compare bytes)
    assert rec.largest_bytes <= budget, f"{rec.op}: {rec.largest_bytes} bytes > the {budget}-byte workspace"
