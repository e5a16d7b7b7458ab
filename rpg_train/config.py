"""Run configuration: nested dataclasses, named presets, YAML files and ``key=value`` overrides.

A run's configuration is built in three layers, each overriding the one before::

    preset (PRESETS[name])  ->  YAML file (--config)  ->  --set section.key=value

and saved beside the run as ``config.yaml`` (which ``--config`` accepts back).

Every value is converted to its field's annotated type as it is set (``"1e-3"`` -> ``0.001`` for a float,
``"none"`` -> ``None`` for an optional field), and `validate` then checks every field's range and the
fields against each other, so a bad value fails here, naming the field, before any model loads. All of
these errors are `ConfigError` (a ``ValueError``), which the CLI prints as one line (exit status 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PARALLEL_MODES = ("ddp", "fsdp")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("none", "tensorboard", "wandb")
# TRL's four modes (rpg_kernels.config.ROLLOUT_IS_MODES), for algo.rollout_correction
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# advantage estimators whose baseline is the prompt's group: with one completion per prompt they are 0
GROUP_ESTIMATORS = ("group_mean", "group_normalized", "rloo")


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its field (the CLI exits with status 2)."""


class ConfigFileNotFound(ConfigError, FileNotFoundError):
    """A file the configuration names does not exist."""


PACKING_MODES = ("auto", "always", "never")  # train.packing (rpg_train.batching)


@dataclass
class ModelConfig:
    path: str | None = None  # HF model directory; None = build the tiny model (rpg_train.tiny)
    dtype: str = "auto"  # parameter dtype: auto (float32), float32, bfloat16
    gradient_checkpointing: bool = False
    autocast_bf16: bool = True  # bf16 autocast for forward passes (only on CUDA)
    attn_implementation: str | None = None  # transformers' attn_implementation (None: its default, sdpa)


@dataclass
class DataConfig:
    train_file: str | None = None  # None with model.path None = the tiny task
    eval_file: str | None = None
    prompt_key: str | None = None  # None = detect the schema (see rpg_train.data)
    answer_key: str | None = None
    chat_template: bool = False
    reward: str = "math"  # rpg_train.rewards.make_reward_fn name
    overlong_buffer: int = 0  # DAPO soft overlong penalty length (0 = off)
    tiny_seed: int | None = None  # seed of the generated tiny model/task; None = train.seed
    # prompts longer than rollout.max_model_len - rollout.max_tokens: an error naming the row (false) or
    # skipped with a count (true)
    drop_long_prompts: bool = False


@dataclass
class RolloutConfig:
    backend: str = "auto"  # auto | vllm | hf
    group_size: int = 16  # completions per prompt
    max_tokens: int = 4096  # completion length cap
    max_model_len: int = 8192
    temperature: float = 1.0
    gpu_memory_utilization: float = 0.5
    sleep_between_steps: bool = True  # vLLM sleep mode (weights to CPU, KV cache freed) while training (GPU)


@dataclass
class AlgoConfig:
    loss: str = "rpg_reinforce"  # rpg_kernels.LossConfig.preset name
    loss_overrides: dict[str, Any] = field(default_factory=dict)  # kl, beta, eps_low, eps_high, clip_c, ...
    advantage: str = "rpg"  # rpg_kernels.compute_advantages name
    entropy_coef: float = 0.0
    reward_kl_beta: float = 0.01  # reinforce_pp only: KL penalty in the token rewards (docs/MATH.md §5)
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal, then refill
    dynamic_sampling_max_tries: int = 3
    ref_update: str = "every_step"  # every_step | every_k | kl_threshold | never
    ref_update_k: int = 10  # optimizer steps between reference updates (every_k)
    ref_kl_threshold: float = 0.05  # moving-average token KL that triggers an update (kl_threshold)
    ref_kl_ema: float = 0.9  # smoothing of that moving average
    loss_backend: str = "auto"  # rpg_kernels backend: auto | triton | torch
    # the rollout (training-inference mismatch) correction, docs/MATH.md §9: None (off; the mismatch is
    # still logged) or one of ROLLOUT_CORRECTIONS, with its bounds (None: open on that side)
    rollout_correction: str | None = None
    rollout_correction_min: float | None = None
    rollout_correction_max: float | None = 3.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 10  # linear warm-up (optimizer steps), then constant


@dataclass
class TrainConfig:
    steps: int = 500  # rollout steps
    prompts_per_step: int = 512  # global, over all ranks
    mini_batch_prompts: int = 32  # prompts per optimizer step (global)
    micro_batch_seqs: int = 8  # sequences per forward/backward on one rank (when micro_batch_tokens is 0)
    # cap on prompt + completion tokens per forward/backward, padding included (0: micro_batch_seqs instead);
    # sequences grouped by length, see rpg_train.batching. At least rollout.max_model_len.
    micro_batch_tokens: int = 0
    packing: str = "auto"  # auto (packs for flash_attention_2/3, flex_attention) | always | never
    seed: int = 0
    eval_every: int = 20  # rollout steps between evaluations (0 = never)
    eval_samples: int = 4  # k of mean@k
    eval_max_prompts: int = 512
    eval_temperature: float = 1.0
    checkpoint_every: int = 50  # rollout steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp (every rank holds all states) | fsdp (FSDP2: states sharded over the ranks)
    fsdp_offload: bool = False  # fsdp only: parameters, gradients and optimizer states in CPU memory
    export: bool = True  # write out_dir/final/, a Hugging Face folder of the final policy
    export_dtype: str = (
        "auto"  # auto (bfloat16 after a CUDA run, else float32) | float32 | bfloat16 | float16
    )
    out_dir: str = "runs/rpg"
    progress: bool = True  # a live bar when stderr is a terminal; one line per step otherwise
    log_every: int = 1  # rollout steps between the one-line step logs (0 = none)
    report_to: str = (
        "none"  # none | tensorboard (out_dir/tensorboard/) | wandb (WANDB_MODE=offline: no network)
    )
    wandb_project: str = "rpg_train"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Presets: partial nested dicts applied over the dataclass defaults (which mirror the paper).
# ---------------------------------------------------------------------------------------------

_PAPER_MATH = {  # RPG paper, Qwen-2.5 math runs (DAPO-Math-17k): GPU, user-given model/data paths
    "data": {"reward": "math", "chat_template": True, "overlong_buffer": 0},
    "rollout": {"backend": "vllm", "group_size": 16, "max_tokens": 4096, "max_model_len": 8192},
    "algo": {
        "loss": "rpg_reinforce",
        "advantage": "rpg",
        "loss_overrides": {"kl": "urkl", "beta": 1e-4, "eps_low": 0.2, "eps_high": 0.28, "clip_c": 10.0},
        # bf16 vLLM samples from a slightly different policy than the trainer computes: TRL's default
        # correction (docs/TRAINING.md, "The rollout correction")
        "rollout_correction": "sequence_mask",
        "rollout_correction_min": None,
        "rollout_correction_max": 3.0,
    },
    "optim": {"lr": 1e-6, "weight_decay": 0.1, "grad_clip": 1.0, "warmup_steps": 10},
    "model": {"dtype": "float32", "gradient_checkpointing": True},  # fp32 master weights, bf16 compute
    "train": {
        "prompts_per_step": 512,
        "mini_batch_prompts": 32,
        "micro_batch_seqs": 4,
        # token budgets: 4 sequences of 512 prompt + 4096 response tokens (the memory table's micro-batch)
        "micro_batch_tokens": 18432,
        "eval_every": 20,
        "parallel": "fsdp",  # 16 bytes of states per parameter do not fit an 80 GB GPU for 4B+ models
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = json.loads(json.dumps(base))
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss_overrides":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # CPU demo: tiny generated model + task, real vLLM (CPU) rollouts, a few minutes on 2 cores.
    "tiny": {
        "model": {"path": None, "dtype": "float32"},
        "data": {"reward": "exact_match"},
        "rollout": {"backend": "auto", "group_size": 8, "max_tokens": 2, "max_model_len": 64},
        "algo": {"loss": "rpg_reinforce", "advantage": "rpg", "loss_overrides": {}},
        "optim": {"lr": 2e-3, "weight_decay": 0.0, "grad_clip": 1.0, "warmup_steps": 2},
        "train": {
            "steps": 100,
            "prompts_per_step": 32,
            "mini_batch_prompts": 16,
            "micro_batch_seqs": 256,
            "eval_every": 20,
            "eval_samples": 4,
            "eval_max_prompts": 40,
            "checkpoint_every": 25,
            "out_dir": "runs/tiny",
        },
    },
    "rpg": _PAPER_MATH,  # RPG-REINFORCE, urkl, dual clip, iterative reference (paper Alg. 2)
    "rpg_8k": _merge(
        _PAPER_MATH,
        {
            "rollout": {"max_tokens": 8192, "max_model_len": 9216},
            "train": {"micro_batch_tokens": 34816},  # 4 x (512 + 8192)
        },
    ),
    "rpg_fkl": _merge(
        _PAPER_MATH,
        {
            "algo": {
                "loss_overrides": {
                    "kl": "fkl",
                    "beta": 1e-4,
                    "eps_low": 0.2,
                    "eps_high": 0.28,
                    "clip_c": 10.0,
                }
            }
        },
    ),
    # Baselines (docs/MATH.md §3 presets; their own advantage estimators, same data / optimiser / lengths).
    "grpo": _merge(
        _PAPER_MATH,
        {"algo": {"loss": "grpo", "advantage": "grpo", "loss_overrides": {}, "ref_update": "never"}},
    ),  # GRPO's k3 KL to the initial policy
    "dapo": _merge(
        _PAPER_MATH,
        {
            "algo": {"loss": "dapo", "advantage": "grpo", "loss_overrides": {}, "dynamic_sampling": True},
            "data": {"overlong_buffer": 1024},
        },
    ),
    "reinforce_pp": _merge(
        _PAPER_MATH,
        {
            "algo": {
                "loss": "reinforce_pp",
                "advantage": "reinforce_pp",
                "loss_overrides": {},
                "ref_update": "never",
            }
        },
    ),
}


# ---------------------------------------------------------------------------------------------
# Building a Config
# ---------------------------------------------------------------------------------------------


def _apply(obj: Any, updates: dict[str, Any], where: str) -> None:
    """Set fields of dataclass ``obj`` from ``updates`` (nested dicts for nested dataclasses), each
    converted to its annotated type."""
    names = {f.name: f for f in fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(f"unknown config key {where}{key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key} is a section; give a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{where}{key}"))


def _number(value: Any, name: str, kind: type) -> int | float:
    """``value`` (a number or a numeric string; never a boolean) as a finite ``kind``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"config key {name} must be a number, got {value!r}")
    if kind is int and isinstance(value, int):
        return value
    try:
        number = int(value) if kind is int and isinstance(value, str) and value.strip().isdigit() else None
        number = float(value) if number is None else number
    except ValueError:
        raise ConfigError(f"config key {name} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"config key {name} must be a finite number, got {value!r}")
    if kind is int:
        if number != int(number):
            raise ConfigError(f"config key {name} must be an integer, got {value!r}")
        return int(number)
    return float(number)


def _numbers_in(mapping: dict[str, Any]) -> dict[str, Any]:
    """Numeric strings of a free-form mapping as numbers: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    out = {}
    for key, value in mapping.items():
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` (from YAML or the CLI) converted to the annotated type ``hint``, or a `ConfigError`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None: the only unions here
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if hint is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name} must be a boolean, got {value!r}")
        return value
    if hint in (int, float):
        return _number(value, name, hint)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a path or name that YAML read as a number
        if not isinstance(value, str):
            raise ConfigError(f"config key {name} must be a string, got {value!r}")
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {name} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, arg, f"{name}[{i}]") for i, (v, arg) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name} must be a mapping, got {value!r}")
        return _numbers_in(value)
    return value


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-5}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(
            f"--set {text}: the value is not valid YAML ({' '.join(str(err).split())})"
        ) from None
    out: dict[str, Any] = value
    for part in reversed(dotted.strip().split(".")):
        if not part:
            raise ConfigError(f"--set key {dotted!r} has an empty part")
        out = {part: out}
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFound(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Config:
    """Defaults <- ``PRESETS[preset]`` <- YAML ``config_file`` <- ``overrides`` (``key=value`` strings).

    A YAML file may name its own base with a top-level ``preset:`` key.
    """
    layers: list[tuple[dict[str, Any], str]] = []
    file_data = load_yaml(config_file) if config_file is not None else {}
    preset = preset or file_data.pop("preset", None)
    file_data.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        layers.append((PRESETS[preset], f"preset {preset}: "))
    layers.append((file_data, f"{config_file}: "))
    layers += [(parse_override(text), f"--set {text}: ") for text in overrides]
    cfg = Config()
    for updates, origin in layers:
        try:
            _apply(cfg, updates, "")
        except ConfigError as err:
            raise ConfigError(f"{origin}{err}") from None
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _normalise(obj: Any, where: str = "") -> None:
    """Convert every field of ``obj`` (a Config built in Python, say) to its annotated type, in place."""
    hints = typing.get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _normalise(value, f"{where}{f.name}.")
        else:
            setattr(obj, f.name, _coerce(value, hints[f.name], f"{where}{f.name}"))


def _one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    _check(value in valid, f"{name} must be one of {', '.join(map(str, valid))}; got {value!r}")


def loss_config(cfg: Config) -> Any:
    """The run's `rpg_kernels.LossConfig`: ``algo.loss``'s preset, ``algo.loss_overrides``, the rollout
    correction, and Dr. GRPO's ``max_completion_length`` (``rollout.max_tokens``) unless overridden; a
    `ConfigError` naming the ``algo`` field at fault."""
    import rpg_kernels as rk
    from rpg_kernels.config import PRESETS as LOSS_PRESETS

    a = cfg.algo
    _one_of("algo.loss", a.loss, tuple(LOSS_PRESETS))
    given = sorted(k for k in a.loss_overrides if k.startswith("rollout_is"))
    _check(
        not given,
        f"algo.loss_overrides: set the rollout correction with algo.rollout_correction*, not {given}",
    )
    try:
        base = rk.LossConfig.preset(a.loss, **a.loss_overrides)
        if base.agg == "seq-mean-token-sum-norm" and base.max_completion_length is None:
            # Dr. GRPO's constant L, whatever a micro-batch's width (token budgets make widths vary)
            base = base.replace(max_completion_length=cfg.rollout.max_tokens)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"algo.loss_overrides (algo.loss={a.loss}): {err}") from None
    if a.rollout_correction is not None:
        _one_of("algo.rollout_correction", a.rollout_correction, ROLLOUT_CORRECTIONS)
    try:
        return base.replace(
            rollout_is=a.rollout_correction,
            rollout_is_min=a.rollout_correction_min,
            rollout_is_max=a.rollout_correction_max,
        )
    except (TypeError, ValueError) as err:
        message = (
            str(err)
            .replace("rollout_is_", "algo.rollout_correction_")
            .replace("rollout_is", "algo.rollout_correction")
        )
        raise ConfigError(message) from None


def validate(cfg: Config) -> None:
    """Every field's type and range, and the fields against each other (a `ConfigError` naming the field).

    Cheap and import-light (no model, no data): `build_config` calls it, so a bad value fails before
    anything loads. The prompts' lengths are checked when they are read (`rpg_train.data`).
    """
    from rpg_kernels.advantages import ADVANTAGE_ALIASES, ADVANTAGE_ESTIMATORS  # compute_advantages' names
    from rpg_train.rewards import REWARD_NAMES

    _normalise(cfg)
    t, r, a, o, d = cfg.train, cfg.rollout, cfg.algo, cfg.optim, cfg.data
    for name, value, low in [
        ("train.steps", t.steps, 1),
        ("train.prompts_per_step", t.prompts_per_step, 1),
        ("train.mini_batch_prompts", t.mini_batch_prompts, 1),
        ("train.micro_batch_seqs", t.micro_batch_seqs, 1),
        ("train.eval_samples", t.eval_samples, 1),
        ("train.eval_max_prompts", t.eval_max_prompts, 1),
        ("rollout.group_size", r.group_size, 1),
        ("rollout.max_tokens", r.max_tokens, 1),
        ("rollout.max_model_len", r.max_model_len, 2),
        ("algo.ref_update_k", a.ref_update_k, 1),
        ("train.eval_every", t.eval_every, 0),
        ("train.checkpoint_every", t.checkpoint_every, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 0),
        ("train.log_every", t.log_every, 0),
        ("optim.warmup_steps", o.warmup_steps, 0),
        ("algo.dynamic_sampling_max_tries", a.dynamic_sampling_max_tries, 0),
        ("data.overlong_buffer", d.overlong_buffer, 0),
        ("train.micro_batch_tokens", t.micro_batch_tokens, 0),
    ]:
        _check(value >= low, f"{name} must be >= {low}, got {value}")
    _check(
        t.micro_batch_tokens == 0 or t.micro_batch_tokens >= r.max_model_len,
        f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be 0 (off) or at least "
        f"rollout.max_model_len ({r.max_model_len}), the longest sequence a micro-batch must hold",
    )
    _one_of("train.packing", t.packing, PACKING_MODES)
    for name, value, ok, want in [
        ("optim.lr", o.lr, o.lr > 0, "> 0"),
        ("optim.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("optim.grad_clip", o.grad_clip, o.grad_clip > 0, "> 0"),
        ("optim.betas", o.betas, all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        # the trainer's log-probs divide the logits by it: 0 (greedy) has no log-probs to train on
        (
            "rollout.temperature",
            r.temperature,
            r.temperature > 0,
            "> 0 (greedy sampling cannot be trained on)",
        ),
        (
            "rollout.gpu_memory_utilization",
            r.gpu_memory_utilization,
            0 < r.gpu_memory_utilization <= 1,
            "in (0, 1]",
        ),
        ("train.eval_temperature", t.eval_temperature, t.eval_temperature >= 0, ">= 0"),
        ("algo.reward_kl_beta", a.reward_kl_beta, a.reward_kl_beta >= 0, ">= 0"),
        ("algo.ref_kl_threshold", a.ref_kl_threshold, a.ref_kl_threshold > 0, "> 0"),
        ("algo.ref_kl_ema", a.ref_kl_ema, 0 <= a.ref_kl_ema < 1, "in [0, 1)"),
    ]:
        _check(ok, f"{name} must be {want}, got {value}")
    _check(
        r.max_tokens < r.max_model_len,
        f"rollout.max_tokens ({r.max_tokens}) must be < rollout.max_model_len ({r.max_model_len}): a "
        "prompt and its completion must fit the engine's context",
    )
    _check(
        t.prompts_per_step % t.mini_batch_prompts == 0,
        f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of "
        f"train.mini_batch_prompts ({t.mini_batch_prompts})",
    )
    _one_of("algo.ref_update", a.ref_update, ("every_step", "every_k", "kl_threshold", "never"))
    _one_of("algo.loss_backend", a.loss_backend, ("auto", "triton", "torch"))
    advantages = (*ADVANTAGE_ESTIMATORS, *ADVANTAGE_ALIASES)
    _one_of("algo.advantage", a.advantage, advantages)
    estimator = ADVANTAGE_ALIASES.get(a.advantage, a.advantage)
    _check(
        r.group_size > 1 or estimator not in GROUP_ESTIMATORS,
        f"rollout.group_size=1 with algo.advantage={a.advantage} ({estimator}): the baseline is the "
        "group's own reward, so every advantage is 0 and nothing trains; use rollout.group_size >= 2 or "
        "algo.advantage=batch_mean / reinforce_pp",
    )
    loss_config(cfg)
    _one_of("rollout.backend", r.backend, ("auto", "vllm", "hf"))
    _one_of("data.reward", d.reward, REWARD_NAMES)
    _one_of("train.device", t.device, ("auto", "cpu", "cuda"))
    _one_of("train.parallel", t.parallel, PARALLEL_MODES)
    _check(
        not t.fsdp_offload or t.parallel == "fsdp",
        f"train.fsdp_offload needs train.parallel=fsdp; got train.parallel={t.parallel!r}",
    )
    _one_of("train.export_dtype", t.export_dtype, EXPORT_DTYPES)
    _one_of("train.report_to", t.report_to, REPORT_TO)
    _one_of("model.dtype", cfg.model.dtype, ("auto", "float32", "bfloat16"))
    _check(
        (cfg.model.path is None) == (d.train_file is None),
        "give both model.path and data.train_file (a real run) or neither (the tiny task); "
        f"got model.path={cfg.model.path!r}, data.train_file={d.train_file!r}",
    )


# what a resumed run may change without leaving the trajectory of the run it continues
_RESUME_FREE = {
    "train.steps",
    "train.out_dir",
    "train.progress",
    "train.log_every",
    "train.report_to",
    "train.wandb_project",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.export",
    "train.export_dtype",
    "train.eval_every",
    "train.eval_samples",
    "train.eval_max_prompts",
    "train.eval_temperature",
}


def _flat(data: dict[str, Any], where: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "loss_overrides":
            out.update(_flat(value, f"{where}{key}."))
        else:
            out[f"{where}{key}"] = value
    return out


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    """``"key: saved -> now"`` for every field that differs from ``saved`` (a checkpoint's
    ``Config.to_dict()``) and changes the training (steps, output, logging and evaluation are free)."""
    before, now = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(cfg.to_dict())))
    return [
        f"{key}: {before[key]!r} -> {now[key]!r}"
        for key in now
        if key in before and key not in _RESUME_FREE and before[key] != now[key]
    ]


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data, "")
    validate(cfg)
    return cfg
