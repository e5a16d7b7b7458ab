"""StreamingLoss (chunk by chunk) equals rpg_loss on the whole batch: value, metrics and grads."""

import dataclasses

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.config import AGGS, ALGOS, KLS
from rpg_kernels.loss.aggregation import aggregation_weights
from rpg_kernels.loss.inputs import prepare_loss_inputs, validate_loss_inputs
from rpg_kernels.loss.streaming import StreamingLoss, supports_streaming

STREAMING_ALGOS = [a for a in ALGOS if a != "gspo"]
CASES = [(algo, kl, agg) for algo in STREAMING_ALGOS for kl, agg in zip(KLS, AGGS)]


def make_stream(old, adv, mask, ref, cfg, num_items=None, coef=0.0, dtype=torch.float32):
    """A StreamingLoss as the fused loss builds it: validated, prepared inputs and their weights."""
    raw = validate_loss_inputs(None, old, adv, mask, ref, config=cfg, num_items=num_items, entropy_coef=coef)
    prepared = prepare_loss_inputs(dataclasses.replace(raw, dtype=dtype))
    weights = aggregation_weights(prepared.mask, cfg.agg, num_items, dtype)
    return StreamingLoss(prepared, weights, cfg, coef)


def make_batch(seed, b=4, t=9):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=gen) * 3 - 0.5
    logprobs = old + 0.6 * torch.randn(b, t, generator=gen)  # ratios in every clip zone
    ref = old + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, generator=gen)
    adv[0] = 0.0
    mask = torch.rand(b, t, generator=gen) > 0.25
    mask[1] = False  # an empty sequence
    old[~mask] = float("nan")  # masked-out garbage must not leak
    entropy = torch.rand(b, t, generator=gen) * 4
    return logprobs, old, adv, mask, ref, entropy


@pytest.mark.parametrize("algo,kl,agg", CASES)
@pytest.mark.parametrize("with_ref,num_items,chunk", [(False, None, 5), (True, 7.0, 1), (True, None, 36)])
def test_streaming_equals_rpg_loss(algo, kl, agg, with_ref, num_items, chunk):
    seed = CASES.index((algo, kl, agg))
    logprobs, old, adv, mask, ref, entropy = make_batch(seed)
    ref = ref if with_ref else None
    kwargs = {"kl": kl} if algo.startswith("rpg") else {}
    cfg = rk.LossConfig.preset(algo, agg=agg, **kwargs)
    coef = 0.05

    lp = logprobs.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    expected, expected_metrics = rk.rpg_loss(
        lp, old, adv, mask, ref, cfg, num_items, entropy=ent, entropy_coef=coef
    )
    expected.backward()

    stream = make_stream(old, adv, mask, ref, cfg, num_items, coef)
    flat_lp, flat_ent = logprobs.reshape(-1), entropy.reshape(-1)
    g_l, g_h = [], []
    for n0 in range(0, flat_lp.numel(), chunk):
        rows = slice(n0, n0 + chunk)
        grad_l, grad_h = stream.token_grads(rows, flat_lp[rows], flat_ent[rows])
        g_l.append(grad_l)
        g_h.append(grad_h)
    loss, metrics = stream.finish()

    torch.testing.assert_close(loss, expected.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.cat(g_l), lp.grad.reshape(-1), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.cat(g_h), ent.grad.reshape(-1), rtol=1e-6, atol=1e-8)
    assert lp.grad.abs().sum() > 0
    assert metrics.keys() == expected_metrics.keys()
    for name in metrics:
        torch.testing.assert_close(metrics[name], expected_metrics[name], rtol=1e-6, atol=1e-7, msg=name)


def test_streaming_without_entropy_bonus_returns_no_entropy_grad():
    logprobs, old, adv, mask, ref, entropy = make_batch(0)
    stream = make_stream(old, adv, mask, None, rk.LossConfig(), dtype=torch.float64)
    grad_l, grad_h = stream.token_grads(slice(0, 5), logprobs.reshape(-1)[:5], entropy.reshape(-1)[:5])
    assert grad_h is None and grad_l.dtype == torch.float32 and stream.dtype == torch.float64


def test_gspo_does_not_stream():
    _, old, adv, mask, _, _ = make_batch(0)
    cfg = rk.LossConfig.preset("gspo")
    assert not supports_streaming(cfg)
    assert all(supports_streaming(rk.LossConfig.preset(a)) for a in STREAMING_ALGOS)
    with pytest.raises(ValueError, match="gspo"):
        make_stream(old, adv, mask, None, cfg)
