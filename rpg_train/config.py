"""Run configuration: nested dataclasses, named presets, YAML files and ``key=value`` overrides.

A run's configuration is built in three layers, each overriding the one before::

    preset (PRESETS[name])  ->  YAML file (--config)  ->  --set section.key=value

and saved beside the run as ``config.yaml`` (which ``--config`` accepts back).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PARALLEL_MODES = ("ddp", "fsdp")
EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")
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
    progress: bool = True


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
    """Set fields of dataclass ``obj`` from ``updates`` (nested dicts for nested dataclasses)."""
    names = {f.name: f for f in fields(obj)}
    for key, value in updates.items():
        if key not in names:
            raise ValueError(f"unknown config key {where}{key!r}; known: {sorted(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key} is a section; give a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value: Any, current: Any, name: str) -> Any:
    """Convert ``value`` to the type of the current value (YAML/CLI strings, lists for tuples)."""
    if isinstance(current, bool):
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
        if not isinstance(value, bool):
            raise ValueError(f"config key {name} must be a boolean, got {value!r}")
        return value
    if isinstance(current, tuple):
        return tuple(value)
    if isinstance(current, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"config key {name} must be a number, got {value!r}") from None
        if isinstance(current, int) and not isinstance(current, bool):
            if number != int(number):
                raise ValueError(f"config key {name} must be an integer, got {value!r}")
            return int(number)
        return number
    return value


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=1e-5"`` -> ``{"optim": {"lr": 1e-5}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    out: dict[str, Any] = value
    for part in reversed(dotted.strip().split(".")):
        if not part:
            raise ValueError(f"--set key {dotted!r} has an empty part")
        out = {part: out}
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(data).__name__}")
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
            raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        layers.append((PRESETS[preset], f"preset {preset}: "))
    layers.append((file_data, f"{config_file}: "))
    layers += [(parse_override(text), f"--set {text}: ") for text in overrides]
    cfg = Config()
    for updates, origin in layers:
        try:
            _apply(cfg, updates, "")
        except ValueError as err:
            raise ValueError(f"{origin}{err}") from None
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cheap consistency checks; the library validates the loss settings itself."""
    t, r, a = cfg.train, cfg.rollout, cfg.algo
    for name, value in [
        ("train.steps", t.steps),
        ("train.prompts_per_step", t.prompts_per_step),
        ("train.mini_batch_prompts", t.mini_batch_prompts),
        ("train.micro_batch_seqs", t.micro_batch_seqs),
        ("rollout.group_size", r.group_size),
        ("rollout.max_tokens", r.max_tokens),
    ]:
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if t.micro_batch_tokens < 0:
        raise ValueError(f"train.micro_batch_tokens must be >= 0 (0 = off), got {t.micro_batch_tokens}")
    if 0 < t.micro_batch_tokens < r.max_model_len:
        raise ValueError(
            f"train.micro_batch_tokens ({t.micro_batch_tokens}) must be 0 (off) or at least "
            f"rollout.max_model_len ({r.max_model_len}), the longest sequence a micro-batch must hold"
        )
    if t.packing not in PACKING_MODES:
        raise ValueError(f"train.packing must be one of {PACKING_MODES}; got {t.packing!r}")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise ValueError(
            f"train.prompts_per_step ({t.prompts_per_step}) must be a multiple of "
            f"train.mini_batch_prompts ({t.mini_batch_prompts})"
        )
    if a.ref_update not in ("every_step", "every_k", "kl_threshold", "never"):
        raise ValueError(
            f"algo.ref_update must be every_step, every_k, kl_threshold or never; got {a.ref_update!r}"
        )
    if r.backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"rollout.backend must be auto, vllm or hf; got {r.backend!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda; got {t.device!r}")
    if t.parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}; got {t.parallel!r}")
    if t.fsdp_offload and t.parallel != "fsdp":
        raise ValueError(f"train.fsdp_offload needs train.parallel=fsdp; got train.parallel={t.parallel!r}")
    if t.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"train.export_dtype must be one of {EXPORT_DTYPES}; got {t.export_dtype!r}")
    if cfg.model.dtype not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"model.dtype must be auto, float32 or bfloat16; got {cfg.model.dtype!r}")
    if (cfg.model.path is None) != (cfg.data.train_file is None):
        raise ValueError(
            "give both model.path and data.train_file (a real run) or neither (the tiny task); "
            f"got model.path={cfg.model.path!r}, data.train_file={cfg.data.train_file!r}"
        )


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    _apply(cfg, data, "")
    validate(cfg)
    return cfg
