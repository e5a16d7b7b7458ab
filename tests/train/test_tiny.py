"""The embedded tiny assets: deterministic, loadable by transformers, tokenizer round-trips the task text."""

import hashlib
import json

import pytest
import torch

from rpg_train.tiny import OPERATIONS, TinyAssets, build_tiny_assets, build_tokenizer, task_rows


def _digest(assets: TinyAssets) -> dict[str, str]:
    files = [assets.train_file, assets.eval_file, *sorted(assets.model_dir.iterdir())]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyAssets:
    return build_tiny_assets(tmp_path_factory.mktemp("tiny") / "seed0", seed=0)


def test_same_seed_same_files_other_seed_differs(assets, tmp_path):
    again = build_tiny_assets(tmp_path / "again", seed=0)
    assert _digest(again) == _digest(assets)
    other = build_tiny_assets(tmp_path / "other", seed=1)
    differ = {name for name, h in _digest(other).items() if h != _digest(assets)[name]}
    assert {"model.safetensors", "train.jsonl", "eval.jsonl"} <= differ


def test_building_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_assets(tmp_path, seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_task_files_split_and_answers(assets):
    train, evaluation = _rows(assets.train_file), _rows(assets.eval_file)
    prompts = [r["prompt"] for r in train + evaluation]
    assert len(prompts) == len(set(prompts)) == len(task_rows())
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert 0.1 < len(evaluation) / len(prompts) < 0.3
    for row in train + evaluation:
        a, b = int(row["prompt"][0]), int(row["prompt"][-2])
        op = row["prompt"][1:-2]
        assert row["answer"] == str(OPERATIONS[op](a, b))


def test_task_rows_rejects_unknown_operation():
    with pytest.raises(ValueError, match="operations"):
        task_rows(["max", "pow"])
    sums = {r["answer"] for r in task_rows(["+"]) if r["prompt"].startswith("7+")}
    assert sums == {str(d) for d in range(10)}


def test_autotokenizer_round_trips_task_text(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    for row in task_rows(list(OPERATIONS))[::7]:
        ids = tokenizer(row["prompt"])["input_ids"]
        assert len(ids) == 4  # a, op, b, "=": one token each, no BOS
        assert tokenizer.decode(ids) == row["prompt"]
        answer_ids = tokenizer(row["answer"])["input_ids"]
        completion = [*answer_ids, tokenizer.eos_token_id]
        assert tokenizer.decode(completion, skip_special_tokens=True) == row["answer"]


def test_model_loads_and_is_the_agreed_size(assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.model_dir)
    config = model.config
    assert config.model_type == "qwen2"
    assert config.hidden_size // config.num_attention_heads == 64  # vLLM's CPU attention needs this
    assert 1e5 < sum(p.numel() for p in model.parameters()) < 2e6
    ids = torch.tensor([[3, 4, 5, 15]])
    logits = model(ids).logits
    assert logits.shape == (1, 4, config.vocab_size) and torch.isfinite(logits).all()
    # random init: the next-token distribution is close to uniform, not degenerate
    probs = logits[0, -1].softmax(-1)
    assert probs.max() < 3.0 / config.vocab_size
