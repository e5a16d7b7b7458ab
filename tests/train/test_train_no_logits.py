"""The trainer's loss path (old log-probs, loss, backward) never materialises ``[N, V]`` logits.

Every tensor an op returns is recorded by a ``TorchDispatchMode``; with ``V = 32768`` far larger than the
other dimensions, no tensor may exceed the fused loss's workspace budget (``TORCH_WORKSPACE_BYTES``), an
eighth of ``N * V`` fp32 logits or less. The same recorder does see the logits of a plain ``model(...)``
call, so the check can fail.
"""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.ops.lm_head import TORCH_WORKSPACE_BYTES
from rpg_train.logprobs import PolicyLoss, build_batch, sequence_logprobs
from tests.support import LargestAllocation, tiny_causal_lm

VOCAB, HIDDEN = 32768, 32


def tiny_model():
    return tiny_causal_lm(
        "qwen2",
        tie_word_embeddings=True,
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=1,
        max_position_embeddings=256,
    )


@pytest.mark.timeout(120)
def test_loss_path_never_builds_logits():
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (4,), generator=gen).tolist() for _ in range(32)]
    completions = [torch.randint(0, VOCAB, (150,), generator=gen).tolist() for _ in range(32)]
    batch = build_batch(prompts, completions, pad_id=0)
    n_rows = batch.targets.numel()  # N: every scored row, padding included
    limit = TORCH_WORKSPACE_BYTES
    assert limit <= n_rows * VOCAB * 4 // 8 and VOCAB * HIDDEN * 4 < limit  # the head and its grad allowed

    policy = PolicyLoss(model, rk.LossConfig.preset("rpg_reinforce"), backend="torch")
    with LargestAllocation() as recorder:
        old, _ = sequence_logprobs(policy, batch, micro_batch=32)
        advantages = torch.randn(len(batch), generator=gen)
        loss, _ = policy(batch, old - 0.1 * batch.mask, advantages, num_items=None)
        loss.backward()
    assert torch.isfinite(loss)
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    assert recorder.largest_bytes <= limit, (
        f"{recorder.op} made {recorder.largest_bytes} bytes (limit {limit})"
    )

    with LargestAllocation() as recorder:  # the recorder sees logits when they exist
        model(batch.input_ids, attention_mask=batch.attention_mask).logits.sum()
    assert recorder.largest_bytes >= 8 * limit
