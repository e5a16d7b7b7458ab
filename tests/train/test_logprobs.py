"""`rpg_train.logprobs`: the batch layout and the fused log-probs of padded micro-batches."""

import pytest
import torch

from rpg_train.logprobs import IGNORE_INDEX, PolicyLoss, build_batch, sequence_logprobs
from tests.support import tiny_causal_lm

VOCAB = 61


def tiny_model(seed: int = 0):
    return tiny_causal_lm("qwen2", seed=seed, vocab_size=VOCAB)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logprobs_match_unpadded_full_forward(seed):
    """Right padding, the K scored columns and micro-batch trimming give each sequence's own log-probs."""
    gen = torch.Generator().manual_seed(seed)
    model = tiny_model(seed)
    lengths = [
        (int(torch.randint(1, 7, (1,), generator=gen)), int(torch.randint(0, 9, (1,), generator=gen)))
        for _ in range(7)
    ]
    lengths[0] = (1, 3)  # a one-token prompt
    prompts = [torch.randint(0, VOCAB, (p,), generator=gen).tolist() for p, _ in lengths]
    completions = [torch.randint(0, VOCAB, (c,), generator=gen).tolist() for _, c in lengths]
    batch = build_batch(prompts, completions, pad_id=0)
    assert batch.mask.sum() == sum(c for _, c in lengths)
    logprobs, entropy = sequence_logprobs(PolicyLoss(model, backend="torch"), batch, micro_batch=3)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        got = logprobs[i][batch.mask[i] > 0]
        assert got.numel() == len(completion)
        assert torch.equal(batch.targets[i][batch.mask[i] > 0], torch.tensor(completion, dtype=torch.long))
        if not completion:
            continue
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            full = torch.log_softmax(model(ids).logits[0].double(), -1)
        expected = full[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
        ent = -(full.exp() * full).sum(-1)[len(prompt) - 1 : -1]
        torch.testing.assert_close(entropy[i][batch.mask[i] > 0].double(), ent, rtol=1e-4, atol=1e-5)
    assert (logprobs[batch.mask == 0] == 0).all() and (batch.targets[batch.mask == 0] == IGNORE_INDEX).all()


def test_policy_loss_without_a_loss_config_computes_log_probs_only():
    model = tiny_model()
    batch = build_batch([[1, 2], [3]], [[4, 5], [6]], pad_id=0)
    with pytest.raises(RuntimeError, match="log-probs only"):
        PolicyLoss(model)(batch, torch.zeros(batch.targets.shape), torch.zeros(2), num_items=None)


def test_build_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt_ids"):
        build_batch([[1], [2]], [[3]], pad_id=0)
    with pytest.raises(ValueError, match="prompt"):
        build_batch([[]], [[3]], pad_id=0)
