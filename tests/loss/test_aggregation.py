"""Aggregation modes (docs/MATH.md §4) on hand-computed examples, and num_items for split batches."""

import pytest
import torch

from rpg_kernels import LossConfig
from rpg_kernels.config import AGGS
from rpg_kernels.loss import loss_and_logprob_grads
from rpg_kernels.loss.aggregation import aggregate, aggregation_weights

VALUES = torch.tensor(
    [[1.0, 2.0, 3.0, 10.0], [4.0, 5.0, 6.0, 20.0], [7.0, 8.0, 9.0, 30.0]], dtype=torch.float64
)
MASK = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # third sequence is empty

# by hand: tokens 1, 2 | 4; two non-empty sequences, T = 4
HAND = {
    "token-mean": (1 + 2 + 4) / 3,
    "seq-mean-token-mean": ((1 + 2) / 2 + 4 / 1) / 2,
    "seq-mean-token-sum": ((1 + 2) + 4) / 2,
    "seq-mean-token-sum-norm": (1 + 2 + 4) / (2 * 4),
}


@pytest.mark.parametrize("agg", AGGS)
def test_hand_computed(agg):
    assert aggregate(VALUES, MASK, agg).item() == pytest.approx(HAND[agg], rel=1e-15)


@pytest.mark.parametrize("agg", AGGS)
def test_num_items_replaces_the_denominator(agg):
    num = 5.0
    hand = {
        "token-mean": (1 + 2 + 4) / num,
        "seq-mean-token-mean": ((1 + 2) / 2 + 4 / 1) / num,
        "seq-mean-token-sum": ((1 + 2) + 4) / num,
        "seq-mean-token-sum-norm": (1 + 2 + 4) / (num * 4),
    }[agg]
    for num_items in (num, int(num), torch.tensor(num)):
        assert aggregate(VALUES, MASK, agg, num_items).item() == pytest.approx(hand, rel=1e-15)


@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_gives_zero_weights(agg):
    weights = aggregation_weights(torch.zeros(3, 4, dtype=torch.bool), agg)
    assert torch.equal(weights, torch.zeros(3, 4))


def test_unknown_agg():
    with pytest.raises(ValueError, match="agg"):
        aggregation_weights(MASK, "mean")


@pytest.mark.parametrize("algo", ["rpg_reinforce", "rpg", "grpo", "gspo"])
@pytest.mark.parametrize("agg", AGGS)
def test_split_batch_with_global_num_items_sums_to_full_batch(agg, algo):
    """Half + half, each given the full batch's count, sums to the full-batch loss and gradient."""
    gen = torch.Generator().manual_seed(len(agg) * 31 + len(algo))
    batch, length = 6, 9
    logprobs = -torch.rand(batch, length, generator=gen, dtype=torch.float64) * 3
    old = logprobs + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(batch, generator=gen, dtype=torch.float64)
    mask = torch.rand(batch, length, generator=gen) < 0.7
    mask[4] = False  # an empty sequence in the second half
    cfg = LossConfig.preset(algo, agg=agg)
    full_loss, full_grad, _, _ = loss_and_logprob_grads(logprobs, old, adv, mask, ref, cfg)
    count = int(mask.sum()) if agg == "token-mean" else int((mask.sum(1) > 0).sum())
    parts = [
        loss_and_logprob_grads(logprobs[s], old[s], adv[s], mask[s], ref[s], cfg, num_items=count)
        for s in (slice(0, 3), slice(3, 6))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], full_loss, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]]), full_grad, rtol=1e-13, atol=1e-16)
    # without num_items the halves are normalised on their own and generally differ
    alone = loss_and_logprob_grads(logprobs[:3], old[:3], adv[:3], mask[:3], ref[:3], cfg)[0]
    assert not torch.isclose(alone, parts[0][0])
