"""Chunked PyTorch path against the float64 reference; gradcheck in fp64 through the public API."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.ops.chunked import (
    DEFAULT_CHUNK_ELEMENTS,
    MIN_TOKENS_PER_CHUNK,
    chunk_sizes,
    chunked_backward,
    chunked_forward,
    chunked_forward_backward,
    single_pass_fits,
    single_pass_token_chunk,
)
from tests.ops.ops_reference import assert_close, head_of, make_problem, reference, upstream

# (seed, N, H, V, chunk_elements): small budgets force token chunks of 1 row and vocabulary chunks.
CASES = [
    (0, 1, 17, 5, 1 << 22),
    (1, 37, 45, 301, 64 * 50),
    (2, 100, 64, 257, 1 << 22),
    (3, 70, 33, 199, 700),
    (4, 300, 24, 1001, 64 * 128),
    (5, 12, 8, 1, 64),
]


@pytest.mark.parametrize("seed,n,h,v,chunk", CASES)
def test_chunked_matches_float64_reference(seed, n, h, v, chunk):
    p = make_problem(seed, n, h, v, bias=seed % 2 == 0, temperature=0.5 + seed / 7)
    logprob, lse, entropy = chunked_forward(head_of(p), with_entropy=True, chunk_elements=chunk)
    ref = reference(p)
    scale = ref["logit_max"].item()
    assert_close("logprob", logprob, ref["logprob"], 1e-5, scale=scale)
    valid = p.targets != -100  # ignored tokens do not run (their lse stays 0)
    assert_close("lse", lse[valid], ref["lse"][valid], 1e-5, scale=scale)
    assert_close("entropy", entropy, ref["entropy"], 1e-5)
    grads = chunked_backward(head_of(p), lse, entropy, upstream(p), chunk_elements=chunk)
    dh, dw, db = grads.hidden, grads.weight, grads.bias
    assert_close("dh", dh, ref["dh"], 1e-5)
    assert_close("dw", dw, ref["dw"], 1e-5)
    if p.bias is not None:
        assert_close("db", db, ref["db"], 1e-5)
    assert (dh[p.targets == -100] == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_chunked_huge_logits(seed):
    p = make_problem(10 + seed, 64, 32, 500, logit_scale=400.0, temperature=1.0)
    logprob, lse, entropy = chunked_forward(head_of(p), with_entropy=True, chunk_elements=64 * 100)
    ref = reference(p)
    assert ref["logit_max"] > 1000
    assert_close("logprob", logprob, ref["logprob"], 1e-6, scale=ref["logit_max"].item())
    assert_close("entropy", entropy, ref["entropy"], 1e-3)
    grads = chunked_backward(head_of(p), lse, entropy, upstream(p), chunk_elements=64 * 100)
    dh, dw = grads.hidden, grads.weight
    assert_close("dh", dh, ref["dh"], 1e-4)
    assert_close("dw", dw, ref["dw"], 1e-4)


def test_chunk_sizes_bound_the_workspace():
    for n, v, budget in [(4096, 32768, 1 << 22), (10, 151936, 1 << 22), (1, 7, 1), (100000, 1000, 1 << 20)]:
        tokens, vocab = chunk_sizes(n, v, budget)
        assert 1 <= tokens <= n and 1 <= vocab <= v
        assert tokens * vocab <= max(budget, 64)


@pytest.mark.parametrize("with_bias,entropy", [(True, True), (False, True), (True, False)])
def test_gradcheck_float64(with_bias, entropy):
    """torch.autograd.gradcheck of the public op (torch backend) in fp64."""
    p = make_problem(7, 5, 4, 9, dtype=torch.float64, bias=with_bias, ignore_frac=0.2)
    p.targets[1] = -100
    inputs = [p.hidden.requires_grad_(), p.weight.requires_grad_()]
    if with_bias:
        inputs.append(p.bias.requires_grad_())

    def fn(h, w, b=None):
        out = rk.fused_linear_logprobs(
            h, w, p.targets, bias=b, temperature=0.8, return_entropy=entropy, backend="torch"
        )
        return out

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# (seed, N, H, V, chunk_elements, entropy grad): blocks of whole vocabulary rows, one or several per N.
SINGLE_PASS_CASES = [
    (20, 1, 17, 5, 1 << 22, True),
    (21, 137, 45, 301, 64 * 301, True),
    (22, 130, 33, 199, 64 * 199, False),
    (23, 300, 24, 1001, 1 << 22, True),
    (24, 257, 20, 37, 100 * 37, True),
    (25, 70, 9, 263, 10 * 263, False),
]


@pytest.mark.parametrize("seed,n,h,v,chunk,entropy_grad", SINGLE_PASS_CASES)
def test_single_pass_matches_float64_reference(seed, n, h, v, chunk, entropy_grad):
    """chunked_forward_backward: per-token grads from the callback, which sees the chunk's log-probs."""
    p = make_problem(seed, n, h, v, bias=seed % 2 == 0, temperature=0.6 + seed / 50)
    ref = reference(p, with_entropy_grad=entropy_grad)
    seen = []

    logprob, entropy = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)

    def token_grads(tokens, chunk_logprob, chunk_entropy):
        seen.append(tokens)
        logprob[tokens], entropy[tokens] = chunk_logprob.double(), chunk_entropy.double()
        return p.grad_logprob[tokens], (p.grad_entropy[tokens] if entropy_grad else None)

    keep = torch.ones(n, dtype=torch.bool)
    grads = chunked_forward_backward(head_of(p), keep, token_grads, chunk_elements=chunk)
    dh, dw, db = grads.hidden, grads.weight, grads.bias
    # only the tokens with a target run, gathered into blocks of whole vocabulary rows
    runs = (p.targets != -100).nonzero()[:, 0]
    block = single_pass_token_chunk(len(runs), v, chunk)
    assert [torch.arange(n)[t].tolist() for t in seen] == [
        runs[i : i + block].tolist() for i in range(0, len(runs), block)
    ]
    assert_close("logprob", logprob, ref["logprob"], 1e-5, scale=ref["logit_max"].item())
    assert_close("entropy", entropy, ref["entropy"], 1e-5)
    assert_close("dh", dh, ref["dh"], 1e-5)
    assert_close("dw", dw, ref["dw"], 1e-5)
    if p.bias is not None:
        assert_close("db", db, ref["db"], 1e-5)
    assert (dh[p.targets == -100] == 0).all()


def test_single_pass_chunks_whole_vocabulary_rows_within_the_budget():
    limit = DEFAULT_CHUNK_ELEMENTS // MIN_TOKENS_PER_CHUNK  # 262144: Qwen's, Llama 3's, Gemma 3's fit
    assert limit >= 262144 and single_pass_fits(limit) and not single_pass_fits(limit + 1)
    assert single_pass_fits(300, 64 * 300) and not single_pass_fits(300, 64 * 300 - 1)
    assert single_pass_token_chunk(1000, 300, 64 * 100) == 64 * 100 // 300  # the budget, in whole rows
    assert single_pass_token_chunk(1000, 300, 300 * 100) == 100
    assert single_pass_token_chunk(5, 300, 300 * 100) == 5
    assert single_pass_token_chunk(5, 300, 10) == 1  # at least one row


def test_masked_out_rows_never_reach_a_product():
    """NaN / inf hidden rows of tokens outside ``keep`` leave the single pass's grads finite and exact."""
    p = make_problem(30, 40, 16, 77, bias=True)
    keep = torch.rand(40, generator=torch.Generator().manual_seed(0)) > 0.3
    p.hidden[~keep] = float("nan")
    p.hidden[(~keep).nonzero()[0, 0]] = float("inf")
    grads = chunked_forward_backward(
        head_of(p), keep, lambda t, lp, ent: (p.grad_logprob[t], p.grad_entropy[t])
    )
    clean = make_problem(30, 40, 16, 77, bias=True)
    clean.grad_logprob[~keep] = 0.0
    clean.grad_entropy[~keep] = 0.0
    ref = reference(clean)
    assert_close("dw", grads.weight, ref["dw"], 1e-5)
    assert_close("db", grads.bias, ref["db"], 1e-5)
    assert (grads.hidden[~keep] == 0).all()
