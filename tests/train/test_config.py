"""`rpg_train.config`: presets, YAML files and --set overrides."""

import json

import pytest

from rpg_train.config import (
    PRESETS,
    Config,
    ConfigError,
    build_config,
    config_differences,
    config_from_dict,
    loss_config,
    parse_override,
    validate,
)


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


# issue 16, finding 6: each was accepted, or failed later (at model load, at a step) or without the field
@pytest.mark.parametrize(
    "bad, field",
    [
        ("rollout.group_size=1", "rollout.group_size=1 with algo.advantage=rpg"),  # trains nothing
        ("rollout.temperature=0", "rollout.temperature"),
        ("algo.advantage=ppo", "algo.advantage"),
        ("optim.betas=[0.9, 0.99, 0.999]", "optim.betas"),
        ("optim.betas=0.9", "optim.betas"),
        ("optim.betas=[a, b]", r"optim.betas\[0\]"),
        ("rollout.max_tokens=64", "rollout.max_tokens"),  # the tiny preset's max_model_len is 64
        ("train.steps=true", "train.steps"),
        ("train.steps=inf", "train.steps"),
        ("optim.lr=nan", "optim.lr"),
        ("algo.entropy_coef=inf", "algo.entropy_coef"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("optim.lr=-1", "optim.lr"),
        ("algo.loss=ppo", "algo.loss"),
        ("algo.loss_overrides={beta: -1}", "algo.loss_overrides"),
        ("algo.loss_overrides={betta: 1}", "algo.loss_overrides"),
        ("data.tiny_seed=abc", "data.tiny_seed"),
        ("data.reward=f1", "data.reward"),
        ("train.report_to=mlflow", "train.report_to"),
        ("algo.rollout_correction=on", "algo.rollout_correction"),
        ("algo.rollout_correction_max=-1", "algo.rollout_correction_max"),
        ("algo.loss_overrides={rollout_is: token_mask}", "algo.rollout_correction"),
        ("algo.ref_kl_ema=1.5", "algo.ref_kl_ema"),
        ("train.keep_checkpoints=-2", "train.keep_checkpoints"),
    ],
)
def test_validation_catches_bad_values_naming_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        build_config("tiny", overrides=[bad])


def test_a_python_built_config_is_validated_too():
    cfg = build_config("tiny")
    cfg.train.steps = True  # bypassing --set
    with pytest.raises(ConfigError, match="train.steps must be a number"):
        validate(cfg)
    cfg.train.steps, cfg.optim.lr = 3, 1  # an int where a float goes is converted
    validate(cfg)
    assert isinstance(cfg.optim.lr, float)


def test_numbers_inside_loss_overrides_are_numbers():
    # YAML 1.1 reads 1e-3 (no dot) as a string; docs/TRAINING.md shows exactly this override
    cfg = build_config("tiny", overrides=["algo.loss_overrides={kl: fkl, beta: 1e-3, clip_c: inf}"])
    assert cfg.algo.loss_overrides == {"kl": "fkl", "beta": 1e-3, "clip_c": float("inf")}
    assert loss_config(cfg).beta == 1e-3


def test_the_gpu_presets_turn_the_rollout_correction_on():
    assert build_config("tiny").algo.rollout_correction is None  # vLLM-CPU in fp32: no mismatch to correct
    for preset in ("rpg", "rpg_8k", "rpg_fkl", "grpo", "dapo", "reinforce_pp"):
        cfg = build_config(preset, overrides=["model.path=/m", "data.train_file=/d.parquet"])
        correction = loss_config(cfg)
        assert (correction.rollout_is, correction.rollout_is_min, correction.rollout_is_max) == (
            "sequence_mask",
            None,
            3.0,
        )
    off = build_config(
        "rpg", overrides=["model.path=/m", "data.train_file=/d", "algo.rollout_correction=none"]
    )
    assert loss_config(off).rollout_is is None


def test_config_differences_name_what_changes_the_training():
    saved = build_config("tiny").to_dict()
    cfg = build_config(
        "tiny", overrides=["train.seed=3", "optim.lr=1e-3", "rollout.group_size=4", "train.steps=500"]
    )
    changed = config_differences(saved, cfg)
    assert changed == ["rollout.group_size: 8 -> 4", "optim.lr: 0.002 -> 0.001", "train.seed: 0 -> 3"]
    assert config_differences(saved, build_config("tiny", overrides=["train.steps=7"])) == []
