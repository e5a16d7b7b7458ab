"""`rpg_train.config`: presets, YAML files and --set overrides."""

import json

import pytest

from rpg_train.config import PRESETS, Config, build_config, config_from_dict, parse_override


def test_config_layers_yaml_roundtrip_and_errors(tmp_path):
    cfg = build_config(
        "tiny", overrides=["optim.lr=1e-4", "algo.loss_overrides={kl: fkl}", "train.progress=no"]
    )
    assert cfg.optim.lr == 1e-4 and cfg.algo.loss_overrides == {"kl": "fkl"} and cfg.train.progress is False
    assert cfg.rollout.group_size == PRESETS["tiny"]["rollout"]["group_size"]
    path = tmp_path / "run.yaml"
    path.write_text(cfg.to_yaml())
    again = build_config(config_file=path)
    assert again == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}
    # paper preset: the defaults of the RPG paper's runs
    paper = build_config("rpg", overrides=["model.path=/m", "data.train_file=/d.parquet"])
    assert (paper.optim.lr, paper.optim.weight_decay, paper.optim.grad_clip, paper.optim.warmup_steps) == (
        1e-6,
        0.1,
        1.0,
        10,
    )
    assert (paper.rollout.group_size, paper.train.prompts_per_step, paper.train.mini_batch_prompts) == (
        16,
        512,
        32,
    )
    assert paper.algo.loss_overrides["beta"] == 1e-4 and paper.rollout.max_tokens == 4096
    for bad, match in [
        ("optim.lrr=1", "optim.lrr"),
        ("train.steps=abc", "train.steps"),
        ("train.steps=1.5", "integer"),
        ("rollout=3", "rollout"),
        ("nokey", "section.key=value"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_config("tiny", overrides=[bad])
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("nope")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_config(config_file=tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="data.train_file"):
        build_config("rpg", overrides=["model.path=/m"])
    with pytest.raises(ValueError, match="mini_batch_prompts"):
        build_config("tiny", overrides=["train.prompts_per_step=10", "train.mini_batch_prompts=4"])
    assert isinstance(Config(), Config)


def test_parallel_settings_and_their_errors():
    assert build_config("tiny").train.parallel == "ddp"
    for preset in ("rpg", "rpg_8k", "grpo", "dapo"):  # the paper's GPU presets shard their states
        paper = build_config(preset, overrides=["model.path=/m", "data.train_file=/d.parquet"])
        assert paper.train.parallel == "fsdp" and not paper.train.fsdp_offload
    assert build_config(
        "tiny", overrides=["train.parallel=fsdp", "train.fsdp_offload=true"]
    ).train.fsdp_offload
    for bad, match in [
        ("train.parallel=zero3", "train.parallel"),
        ("train.fsdp_offload=true", "train.fsdp_offload needs train.parallel=fsdp"),
        ("train.export_dtype=int8", "train.export_dtype"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_config("tiny", overrides=[bad])
