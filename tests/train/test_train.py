"""`rpg_train.train`: its parts (asset checks, rollout collection) without a full run."""

import json

import pytest

from rpg_train.config import ConfigError, build_config
from tests.train.runs import tiny_config


def test_missing_model_or_data_path_names_the_field(tmp_path):
    from rpg_train.train import train

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1 max 2 =", "answer": "2"}\n')
    for overrides, field in [
        ([f"model.path={tmp_path / 'no-model'}", f"data.train_file={data}"], "model.path"),
        ([f"model.path={tmp_path}", f"data.train_file={tmp_path / 'no.jsonl'}"], "data.train_file"),
        (
            [
                f"model.path={tmp_path}",
                f"data.train_file={data}",
                f"data.eval_file={tmp_path / 'no-eval.jsonl'}",
            ],
            "data.eval_file",
        ),
    ]:
        cfg = build_config(
            "rpg", overrides=[*overrides, f"train.out_dir={tmp_path / 'run'}", "train.device=cpu"]
        )
        with pytest.raises(FileNotFoundError, match=rf"{field}: path does not exist: .*no"):
            train(cfg)


def test_dynamic_sampling_drops_all_equal_groups_and_refills():
    from types import SimpleNamespace

    from rpg_train.train import PromptSampler, collect_rollouts

    class ScriptedEngine:
        """Prompt k's completions are "k" or "x": answer "k" gives reward 1, so mixed groups have spread."""

        def generate(self, prompt_token_ids, n, max_tokens, temperature, seed):
            out = []
            for ids in prompt_token_ids:
                k = ids[0]
                texts = [str(k)] * n if k % 3 == 0 else ["x"] * n if k % 3 == 1 else [str(k), "x"] * (n // 2)
                out.append([SimpleNamespace(token_ids=[7], text=t) for t in texts])
            return out

    def reward_fn(texts, answers, *, lengths, max_len):
        return [float(t == a) for t, a in zip(texts, answers)]

    prompts = [SimpleNamespace(token_ids=[k], answer=str(k)) for k in range(30)]
    cfg = build_config(
        "tiny",
        overrides=[
            "rollout.group_size=4",
            "algo.dynamic_sampling=true",
            "algo.dynamic_sampling_max_tries=20",
        ],
    )
    sampler = PromptSampler(prompts, seed=0, rank=0)
    rollouts, stats = collect_rollouts(ScriptedEngine(), sampler, reward_fn, cfg, num_groups=4, seed=0)
    groups = rollouts.rewards.view(4, 4)
    assert (groups.max(1).values > groups.min(1).values).all()  # only groups with a reward spread
    assert stats["dynamic_sampling_kept"] == 1.0 and sampler.position > 4  # it had to refill
    cfg.algo.dynamic_sampling_max_tries = 0  # no refill: all-equal groups fill the gap, and the stat says so
    rollouts, stats = collect_rollouts(
        ScriptedEngine(), PromptSampler(prompts, 0, 0), reward_fn, cfg, 6, seed=0
    )
    assert len(rollouts.rewards) == 24 and stats["dynamic_sampling_kept"] < 1.0
    cfg.algo.dynamic_sampling = False
    rollouts, stats = collect_rollouts(
        ScriptedEngine(), PromptSampler(prompts, 0, 0), reward_fn, cfg, 6, seed=0
    )
    assert len(rollouts.rewards) == 24 and stats == {}


@pytest.mark.timeout(300)
def test_a_prompt_too_long_for_the_engine_fails_before_the_model_loads_or_is_dropped(
    tmp_path, monkeypatch, capsys
):
    # issue 16, finding 6: it crashed the run at the step that first sampled it (hours in on a GPU), naming
    # a batch index, and again at the same step after --resume
    import rpg_train.train as train_module
    from rpg_train.tiny import build_tiny_assets

    assets = build_tiny_assets(tmp_path / "assets")
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{a}max{a}=", "answer": str(a)} for a in range(8)]
    rows[5]["prompt"] = "9max9=" * 20  # 80 tokens: more than max_model_len 64 - max_tokens 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class ModelLoaded(Exception):
        pass

    def build_policy(*args):
        raise ModelLoaded

    monkeypatch.setattr(train_module, "build_policy", build_policy)
    real = [f"model.path={assets.model_dir}", f"data.train_file={data}", "data.reward=exact_match"]
    cfg = tiny_config(tmp_path / "run", *real)
    with pytest.raises(
        ConfigError, match=rf"data.train_file: {data}: row 6: the prompt has 80 tokens, more than 62"
    ):
        train_module.train(cfg)
    with pytest.raises(ModelLoaded):  # the long prompt dropped, counted, and the run goes on to the model
        train_module.train(tiny_config(tmp_path / "run", *real, "data.drop_long_prompts=true"))
    assert "data.train_file: dropped 1 prompt(s) longer than 62 tokens" in capsys.readouterr().out
