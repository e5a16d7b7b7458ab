"""Triton forward kernel (interpreter on CPU) against the float64 reference that builds the logits."""

import pytest
import torch

from rpg_kernels.ops.linear_logprobs_forward import combine_partials, linear_logprobs_forward
from rpg_kernels.ops.lm_head import LMHead
from tests.ops.ops_reference import DEVICES, KERNEL_DTYPES, assert_close, head_of, make_problem, reference

# (seed, N, H, V): N=1, V below/above the interpreter tile (64) and the 2-way vocabulary split,
# H not a multiple of 16 or of the H tile (32).
SHAPES = [
    (0, 1, 17, 5),
    (1, 37, 45, 301),
    (2, 64, 32, 64),
    (3, 100, 33, 257),
    (4, 5, 7, 129),
    (5, 300, 64, 131),
    (6, 33, 48, 1),
]
LOGPROB_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("seed,n,h,v", SHAPES)
def test_forward_matches_float64_reference(seed, n, h, v, dtype, device):
    p = make_problem(
        seed, n, h, v, dtype=dtype, device=device, bias=seed % 2 == 0, temperature=0.5 + seed / 10
    )
    logprob, lse, entropy = linear_logprobs_forward(head_of(p), with_entropy=True)
    ref = reference(p)
    tol = LOGPROB_TOL[dtype]
    assert_close("logprob", logprob, ref["logprob"], tol, scale=ref["logit_max"].item())
    valid = p.targets != -100  # tokens without a target read h = 0: their lse is not the reference's
    assert_close("lse", lse[valid], ref["lse"][valid], tol, scale=ref["logit_max"].item())
    assert_close("entropy", entropy, ref["entropy"], tol, scale=1.0)
    ignored = p.targets == -100
    assert (logprob[ignored] == 0).all() and (entropy[ignored] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_forward_without_entropy_and_huge_logits(seed):
    """Logits of magnitude ~1e3 (temperature 1): finite, exact to fp32 rounding of the logits."""
    p = make_problem(10 + seed, 48, 40, 211, logit_scale=600.0, temperature=1.0)
    logprob, lse, entropy = linear_logprobs_forward(head_of(p))
    ref = reference(p)
    assert entropy is None
    assert ref["logit_max"] > 1000
    assert_close("logprob", logprob, ref["logprob"], 1e-5, scale=ref["logit_max"].item())
    valid = p.targets != -100
    assert_close("lse", lse[valid], ref["lse"][valid], 1e-6, scale=ref["logit_max"].item())
    _, _, entropy = linear_logprobs_forward(head_of(p), with_entropy=True)
    assert_close("entropy", entropy, ref["entropy"], 1e-3, scale=1.0)


def test_forward_non_contiguous_rows_and_custom_ignore_index():
    p = make_problem(20, 40, 24, 97, ignore_index=7)
    wide = torch.randn(40, 50)
    wide[:, 3:27] = p.hidden
    hidden = wide[:, 3:27]  # row stride 50
    logprob, _, _ = linear_logprobs_forward(LMHead(hidden, p.weight, p.bias, p.targets, p.temperature, 7))
    ref = reference(p, ignore_index=7)
    assert_close("logprob", logprob, ref["logprob"], 1e-5, scale=ref["logit_max"].item())


def test_combine_partials_ignores_empty_slices():
    """A vocabulary slice with no columns (max -1e30, sums 0) must not change the result."""
    z = torch.randn(3, 10, dtype=torch.float64) * 5
    y = torch.tensor([1, 7, 3])
    z_target = z.gather(1, y[:, None])[:, 0]
    maxes, sumexps, tsums, targets = [], [], [], []
    for lo, hi in ((0, 4), (4, 10)):
        m = z[:, lo:hi].max(1).values
        shifted = z[:, lo:hi] - m[:, None]
        maxes.append(m)
        sumexps.append(shifted.exp().sum(1))
        tsums.append((shifted.exp() * shifted).sum(1))
        targets.append(torch.where((y >= lo) & (y < hi), z_target, 0.0))
    empty = (torch.full((3,), -1e30, dtype=torch.float64), z.new_zeros(3), z.new_zeros(3), z.new_zeros(3))
    parts = [torch.stack(list(x) + [e]) for x, e in zip((maxes, sumexps, tsums, targets), empty)]
    logprob, lse, entropy = combine_partials(*parts)
    log_p = torch.log_softmax(z, 1)
    torch.testing.assert_close(lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(logprob, log_p.gather(1, y[:, None])[:, 0])
    torch.testing.assert_close(entropy, -(log_p.exp() * log_p).sum(1))
