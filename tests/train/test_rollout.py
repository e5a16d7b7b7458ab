"""Rollout engines on the tiny model: vLLM (CPU) sampling, log-probs, in-memory weight sync; HF fallback."""

import logging

import pytest
import torch

from rpg_train import rollout
from rpg_train.rollout import Completion, HFEngine, RolloutEngine, make_rollout_engine
from rpg_train.tiny import build_tiny_assets

PROMPTS = [[6, 16, 11, 15], [12, 16, 3, 15], [4], [3, 14, 3, 15, 9, 9, 9]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_tiny_assets(tmp_path_factory.mktemp("tiny_rollout"), seed=0)


def trainer_model(assets):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def trainer_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion[k] | prompt + completion[:k]) from the HF forward in fp32, shape [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    logprobs = model(ids).logits[0].double().log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logprobs[positions, torch.tensor(completion)]


def max_logprob_error(model, prompts, completions) -> float:
    return max(
        (trainer_logprobs(model, p, c.token_ids) - torch.tensor(c.logprobs, dtype=torch.float64))
        .abs()
        .max()
        .item()
        for p, group in zip(prompts, completions)
        for c in group
    )


def check_completions(engine, completions, n, max_tokens):
    assert len(completions) == len(PROMPTS) and all(len(group) == n for group in completions)
    eos = engine.tokenizer.eos_token_id
    for group in completions:
        for c in group:
            assert isinstance(c, Completion)
            assert 1 <= len(c.token_ids) <= max_tokens and len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 and lp > -30 for lp in c.logprobs)
            assert eos not in c.token_ids[:-1]
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos else "length")
            assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # random init samples many distinct completions
    assert len({tuple(c.token_ids) for group in completions for c in group}) > n


@pytest.fixture(scope="module")
def vllm_engine(assets):
    pytest.importorskip("vllm")
    engine = make_rollout_engine(assets.model_dir, backend="vllm", max_model_len=assets.max_model_len, seed=0)
    yield engine
    engine.close()  # also tears down the torch.distributed group vLLM set up in this process
    assert engine.llm is None and not torch.distributed.is_initialized()


def test_vllm_generate(vllm_engine, assets):
    assert isinstance(vllm_engine, RolloutEngine)
    completions = vllm_engine.generate(PROMPTS, n=5, max_tokens=6, temperature=1.0, seed=3)
    check_completions(vllm_engine, completions, n=5, max_tokens=6)
    again = vllm_engine.generate(PROMPTS, n=5, max_tokens=6, temperature=1.0, seed=3)
    other = vllm_engine.generate(PROMPTS, n=5, max_tokens=6, temperature=1.0, seed=4)
    ids = lambda cs: [[c.token_ids for c in group] for group in cs]  # noqa: E731
    assert ids(again) == ids(completions) and ids(other) != ids(completions)
    # the sampled tokens' log-probs are the trainer model's (same weights, fp32)
    assert max_logprob_error(trainer_model(assets), PROMPTS, completions) < 1e-3
    # the trainer's thread count survives engine start-up, and set_num_threads still works
    torch.set_num_threads(torch.get_num_threads())


def test_vllm_weight_sync_in_memory(vllm_engine, assets):
    from vllm import SamplingParams

    model = trainer_model(assets)
    sequence = PROMPTS[0] + [11, 2]  # a fixed prompt + completion

    def engine_sequence_logprobs() -> torch.Tensor:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        (output,) = vllm_engine.llm.generate([{"prompt_token_ids": sequence}], params, use_tqdm=False)
        return torch.tensor([step[t].logprob for step, t in zip(output.prompt_logprobs[1:], sequence[1:])])

    def trainer_sequence_logprobs() -> torch.Tensor:
        return trainer_logprobs(model, sequence[:1], sequence[1:]).float()

    before = engine_sequence_logprobs()
    torch.testing.assert_close(before, trainer_sequence_logprobs(), atol=1e-3, rtol=0)

    # one optimizer step on the trainer model, pushing up this completion's log-prob
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    ids = torch.tensor([sequence])
    loss = -model(ids).logits[0, :-1].log_softmax(-1)[torch.arange(len(sequence) - 1), ids[0, 1:]].sum()
    loss.backward()
    optimizer.step()
    model.eval()
    stepped = trainer_sequence_logprobs()
    assert (stepped - before).abs().max() > 0.1  # the step moved the log-probs

    vllm_engine.sleep()  # no-ops on CPU
    vllm_engine.wake()
    assert (engine_sequence_logprobs() - before).abs().max() < 1e-5  # not synced yet
    vllm_engine.sync_weights(model)
    after = engine_sequence_logprobs()
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, stepped, atol=1e-3, rtol=0)
    # sampled log-probs after the sync are the new model's too (prefix cache reset)
    completions = vllm_engine.generate(PROMPTS, n=3, max_tokens=4, temperature=1.0, seed=0)
    assert max_logprob_error(model, PROMPTS, completions) < 1e-3

    vllm_engine.sync_weights(trainer_model(assets))  # back to the saved weights for other tests
    torch.testing.assert_close(engine_sequence_logprobs(), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt_token_ids=[]), "prompt_token_ids"),
        (dict(prompt_token_ids=[[6], []]), r"prompt_token_ids\[1\]"),
        (dict(prompt_token_ids=[[6, 10_000]]), r"prompt_token_ids\[0\].*outside"),
        (dict(prompt_token_ids=[[6] * 62]), "max_model_len"),
        (dict(n=0), "n must"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
    ],
)
def test_generate_rejects_bad_arguments(vllm_engine, kwargs, match):
    args = dict(prompt_token_ids=[[6, 16]], n=2, max_tokens=4, temperature=1.0, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        vllm_engine.generate(**args)


def test_make_rollout_engine_arguments(assets, tmp_path):
    with pytest.raises(ValueError, match="backend"):
        make_rollout_engine(assets.model_dir, backend="sglang")
    with pytest.raises(ValueError, match="config.json"):
        make_rollout_engine(tmp_path, backend="hf")


def test_hf_fallback_is_announced_and_generates(assets, monkeypatch, caplog):
    monkeypatch.setattr(rollout, "vllm_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="rpg_train.rollout"):
        engine = make_rollout_engine(assets.model_dir, backend="auto", max_model_len=assets.max_model_len)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    assert any("transformers.generate" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="not installed"):
        make_rollout_engine(assets.model_dir, backend="vllm")

    completions = engine.generate(PROMPTS, n=4, max_tokens=5, temperature=1.0, seed=0)
    check_completions(engine, completions, n=4, max_tokens=5)
    assert max_logprob_error(engine.model, PROMPTS, completions) < 1e-4
    ids = lambda cs: [[c.token_ids for c in group] for group in cs]  # noqa: E731
    assert ids(engine.generate(PROMPTS, n=4, max_tokens=5, temperature=1.0, seed=0)) == ids(completions)

    # sync copies another module's weights; greedy decoding then follows the new weights
    model = trainer_model(assets)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[9] = 1.0  # tied with the embedding: token 9 ("6") becomes the argmax
    engine.sync_weights(model)
    greedy = engine.generate(PROMPTS[:1], n=1, max_tokens=3, temperature=0.0, seed=0)
    assert greedy[0][0].logprobs is not None
    torch.testing.assert_close(
        torch.tensor(greedy[0][0].logprobs, dtype=torch.float64),
        trainer_logprobs(model, PROMPTS[0], greedy[0][0].token_ids),
        atol=1e-5,
        rtol=0,
    )


def test_hf_engine_generates_with_the_given_module(assets):
    model = trainer_model(assets)
    engine = make_rollout_engine(
        assets.model_dir, backend="hf", model=model, max_model_len=assets.max_model_len
    )
    assert engine.model is model
    engine.sync_weights(model)  # same module: nothing to copy
    model.train()
    engine.generate(PROMPTS[:2], n=2, max_tokens=2, temperature=1.0, seed=0)
    assert model.training  # the engine restores the module's mode
