"""The ``train-step`` suite: one optimizer step of a causal LM with a real vocabulary, method by method.

A step is what one optimizer step of RL training costs on one device: the backbone's forward with gradient
checkpointing, the loss, the backward, gradient clipping and an AdamW step, on a Qwen2-style model built from
a config (random weights, no download) with Qwen's vocabulary ``V = 151936`` (`MODELS`; the CPU one has a
small ``H`` so that a step at 16k tokens takes seconds, not hours). Two tasks:

- ``train-step``: one sequence of `PROMPT_TOKENS` prompt + ``N`` completion tokens (no padding: every method
  sees the same tokens). Methods:

  - ``ours``: the trainer's own loss path, `rpg_train.train.update_policy` on a
    `rpg_train.logprobs.PolicyLoss` (the backbone's hidden states straight into
    `rpg_kernels.fused_linear_rpg_loss`: no logits);
  - ``trl``: TRL 1.16's ``GRPOTrainer._compute_loss`` on a trainer built around the same model and batch
    (``loss_type="dapo"``, ``beta=1e-4``, clip 0.2/0.28). TRL 1.16 does not materialise logits either: it
    patches the model with its own chunked fused LM head (``trl.trainer.utils.add_fused_lm_head``); on CPU the
    tiles of ``4096 x 32768`` logits are folded with PyTorch ops, on CUDA by Triton kernels;
  - ``trl-liger``: the same with ``use_liger_kernel=True``, which in TRL 1.16 applies Liger's layer kernels
    only (RMSNorm, RoPE, SwiGLU; Triton, so CUDA only);
  - ``transformers``: plain transformers: ``model(..., logits_to_keep=K + 1).logits``, fp32 ``log_softmax``,
    ``gather``, then `rpg_kernels.rpg_loss`.

- ``micro-batching``: ``SPREAD_GROUPS x SPREAD_GROUP_SIZE`` sequences, prompts of ``SPREAD_PROMPTS`` tokens
  (one length per group), completions uniform in ``[1, N]``, one optimizer step through ``update_policy`` with
  micro-batches ``fixed`` (``micro_batch_seqs=4``, the GPU presets' before token budgets), ``token-budget``
  (``micro_batch_tokens = 4 x`` the longest sequence allowed, the presets' rule) and ``packed`` (the same
  budget, packed rows; on CPU attention gets transformers' block-diagonal mask).

Peak memory is above the model, its AdamW states (initialised before the baseline) and the inputs: the
gradients and every activation count. `padding_rows` needs no model: the padding fraction of each
micro-batching on the rpg preset's mini-batch, over many draws of the lengths.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.methods import Skip, loss_config
from bench.shapes import Shape

TASKS = ("train-step", "micro-batching")
VOCAB = 151936  # Qwen2 / Qwen2.5's
PROMPT_TOKENS = 128
_LAYER = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
MODELS: dict[str, dict[str, int]] = {  # Qwen2 config fields (tied head, as Qwen2.5-0.5B)
    "qwen2-h64": dict(zip(_LAYER, (64, 256, 2, 2, 1)), vocab_size=VOCAB),  # the CPU run's
    "qwen2-h896": dict(zip(_LAYER, (896, 4864, 4, 14, 2)), vocab_size=VOCAB),  # Qwen2.5-0.5B's layers, 4
    "qwen2-micro": dict(zip(_LAYER, (16, 32, 1, 2, 1)), vocab_size=512),  # the harness's own tests
}
CPU_MODEL, GPU_MODEL = "qwen2-h64", "qwen2-h896"
SPREAD_GROUPS, SPREAD_GROUP_SIZE, SPREAD_PROMPTS = 4, 4, (32, 256)
MICRO_BATCH_SEQS = 4  # the GPU presets' train.micro_batch_seqs
TRAIN_STEP_METHODS = ("ours", "trl", "trl-liger", "transformers")
BATCHING_METHODS = ("fixed", "token-budget", "packed")


def completion_lengths(device: str, quick: bool) -> list[int]:
    """The completion lengths swept (and the search's cap, the last): CPU ``--quick`` 1k, 4k, 16k."""
    if device == "cuda":
        return [1024 * 4**k for k in range(4)] if quick else [1024 * 2**k for k in range(8)]
    return [1024, 4096, 16384] if quick else [1024 * 2**k for k in range(6)]


def spread_cap(device: str) -> int:
    """The completion-length cap of the ``micro-batching`` task."""
    return 8192 if device == "cuda" else 512


def model_shape(name: str, n: int) -> Shape:
    """``n`` completion tokens on model ``name`` (a `MODELS` key)."""
    if name not in MODELS:
        raise ValueError(f"unknown train-step model {name!r}; known: {', '.join(MODELS)}")
    return Shape(name, n, MODELS[name]["hidden_size"], MODELS[name]["vocab_size"])


def default_models(device: str) -> list[str]:
    return [GPU_MODEL if device == "cuda" else CPU_MODEL]


# --- the problem -----------------------------------------------------------------------------------------


@dataclass
class TrainProblem:
    """A model and one step's rollouts, built before measuring (they count in the baseline, not the peak)."""

    shape: Shape
    device: torch.device
    model: nn.Module
    prompts: list[list[int]]
    completions: list[list[int]]
    batch: Any  # rpg_train.logprobs.SequenceBatch, on the CPU (the trainer moves micro-batches)
    old_logprobs: Tensor  # [B, K] float32, on the device
    advantages: Tensor  # [B] float32
    models: list[nn.Module] = field(default_factory=list)  # whose gradients `zero_grad` drops
    extra: dict[str, Any] = field(default_factory=dict)  # reported beside time and memory
    _saved: tempfile.TemporaryDirectory | None = None

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def zero_grad(self) -> None:
        for model in self.models:
            model.zero_grad(set_to_none=True)

    def saved_model_dir(self) -> Path:
        """The model and a tokenizer in a temporary folder (TRL loads its policy and reference from one)."""
        if self._saved is None:
            self._saved = tempfile.TemporaryDirectory(prefix="bench-train-step-")
            tokenizer = tiny_tokenizer()
            self.model.config.pad_token_id = tokenizer.pad_token_id
            self.model.save_pretrained(self._saved.name)
            tokenizer.save_pretrained(self._saved.name)
        return Path(self._saved.name)


def tiny_tokenizer():
    """A word-level tokenizer for TRL's constructor (the benchmark feeds token ids, never text)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[EOS]": 1, "[UNK]": 2}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def build_model(name: str, device: str, seed: int, max_len: int) -> nn.Module:
    """The Qwen2-style causal LM ``name`` (fp32 weights, sdpa attention), with gradient checkpointing."""
    import transformers

    config = transformers.Qwen2Config(
        tie_word_embeddings=True,
        max_position_embeddings=max_len,
        use_cache=False,
        **MODELS[name],
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_problem(shape: Shape, dtype: str, device: str, task: str, seed: int = 0) -> TrainProblem:
    """``train-step``: one sequence of `PROMPT_TOKENS` + ``shape.n`` tokens; ``micro-batching``: the spread
    batch (module docstring) with completions up to ``shape.n``. Random token ids; old log-probs near the
    random model's own (``-log V``), so the ratios stay near 1; deterministic per seed."""
    from rpg_train.logprobs import build_batch

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gen = torch.Generator().manual_seed(seed)
    if task == "train-step":
        prompt_lengths, lengths = [PROMPT_TOKENS], [shape.n]
    else:
        low, high = SPREAD_PROMPTS
        per_group = torch.randint(low, high + 1, (SPREAD_GROUPS,), generator=gen).tolist()
        prompt_lengths = [p for p in per_group for _ in range(SPREAD_GROUP_SIZE)]
        lengths = torch.randint(1, shape.n + 1, (len(prompt_lengths),), generator=gen).tolist()
    prompts, completions = [], []
    for i, (p, c) in enumerate(zip(prompt_lengths, lengths)):
        if task == "micro-batching" and i % SPREAD_GROUP_SIZE:
            prompts.append(prompts[-1])  # a group shares its prompt
        else:
            prompts.append(torch.randint(3, shape.v, (p,), generator=gen).tolist())
        completions.append(torch.randint(3, shape.v, (c,), generator=gen).tolist())
    batch = build_batch(prompts, completions, pad_id=0)
    typical = -math.log(shape.v) - 0.5
    old = (typical + 0.1 * torch.randn(batch.targets.shape, generator=gen)) * batch.mask
    advantages = torch.randn(len(prompts), generator=gen)
    max_len = max(p + c for p, c in zip(prompt_lengths, lengths)) + 1
    model = build_model(shape.name, device, seed, max(max_len, 4096))
    problem = TrainProblem(
        shape, torch.device(device), model, prompts, completions, batch, old.to(device), advantages.to(device)
    )
    problem.models.append(model)
    problem.extra["tokens"] = int(batch.attention_mask.sum())
    problem.extra["sequences"] = len(prompts)
    return problem


def primed_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW whose states exist already (a step on zero gradients moves nothing): they sit in the baseline."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return optimizer


# --- methods -------------------------------------------------------------------------------------------


def _trainer_config(task: str, p: TrainProblem, batching: str):
    """rpg_train's config of the step: one optimizer step over every row; ``batching``: its micro-batches."""
    from rpg_train.config import build_config

    longest = max(len(a) + len(b) for a, b in zip(p.prompts, p.completions))
    cap = p.shape.n if task == "micro-batching" else max(len(b) for b in p.completions)
    max_len = (SPREAD_PROMPTS[1] + cap) if task == "micro-batching" else longest
    groups = SPREAD_GROUPS if task == "micro-batching" else 1
    group_size = len(p.prompts) // groups
    tokens = MICRO_BATCH_SEQS * max_len if batching in ("token-budget", "packed") else 0
    overrides = [
        f"rollout.group_size={group_size}",
        f"train.prompts_per_step={groups}",
        f"train.mini_batch_prompts={groups}",
        f"train.micro_batch_seqs={MICRO_BATCH_SEQS if task == 'micro-batching' else 1}",
        f"train.micro_batch_tokens={tokens}",
        f"train.packing={'always' if batching == 'packed' else 'never'}",
        f"rollout.max_tokens={cap}",
        f"rollout.max_model_len={max_len}",
        "algo.advantage=batch_mean",  # the advantages are the problem's; a group of one must validate
    ]
    return build_config("tiny", overrides=overrides)


def _update_policy_step(task: str, p: TrainProblem, batching: str) -> Callable[[], None]:
    """A step of `rpg_train.train.update_policy`: the trainer's micro-batch loop, clipping, AdamW."""
    from rpg_train.distributed import DistInfo
    from rpg_train.logprobs import PolicyLoss
    from rpg_train.reference import ReferencePolicy
    from rpg_train.train import Policy, micro_batch_plan, update_policy

    cfg = _trainer_config(task, p, batching)
    loss = PolicyLoss(p.model, loss_config(), bf16=p.on_cuda)  # the library's backend for the device
    optimizer = primed_adamw(p.model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy = Policy(p.model, loss, loss, optimizer, scheduler, ReferencePolicy(p.model))
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=p.device)
    plan = micro_batch_plan(cfg, info, policy, p.batch)
    p.extra.update(
        micro_batches=len(plan.flat()),
        padding_fraction=plan.padding_fraction,
        computed_tokens=plan.computed_tokens,
        micro_batch_tokens=cfg.train.micro_batch_tokens,
    )

    def step() -> None:
        update_policy(policy, cfg, info, p.batch, p.old_logprobs, None, p.advantages, plan)

    return step


def ours(task: str, p: TrainProblem) -> Callable[[], None]:
    """The trainer's loss path (``train-step``: the one sequence as one micro-batch)."""
    if task != "train-step":
        raise Skip("ours runs the train-step task; micro-batching compares fixed, token-budget and packed")
    return _update_policy_step(task, p, "fixed")


def _batching(name: str) -> Callable[[str, TrainProblem], Callable[[], None]]:
    def method(task: str, p: TrainProblem) -> Callable[[], None]:
        if task != "micro-batching":
            raise Skip(f"{name} compares micro-batchings: the micro-batching task")
        return _update_policy_step(task, p, name)

    method.__doc__ = f"`update_policy` with {name} micro-batches."
    return method


def trl(task: str, p: TrainProblem, liger: bool = False) -> Callable[[], None]:
    """TRL's ``GRPOTrainer._compute_loss`` on a trainer around the same weights, then backward, clipping,
    AdamW; TRL loads the policy (and its reference, ``beta != 0``) from the saved model."""
    if task != "train-step":
        raise Skip("TRL runs the train-step task")
    if liger and not p.on_cuda:
        raise Skip(
            "use_liger_kernel applies Liger's layer kernels (Triton, CUDA only) in TRL 1.16; no GPU here"
        )
    try:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        if liger:
            import liger_kernel  # noqa: F401
    except ImportError as err:
        raise Skip(f"{err.name} not installed ({err})") from err
    import warnings

    folder = p.saved_model_dir()
    args = GRPOConfig(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=p.shape.n,
        beta=1e-4,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type="dapo",
        use_cpu=not p.on_cuda,
        bf16=p.on_cuda,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        use_liger_kernel=liger,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # use_liger_kernel's deprecation
        trainer = GRPOTrainer(
            model=str(folder),
            reward_funcs=lambda completions, **_: [0.0] * len(completions),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
            processing_class=tiny_tokenizer(),
        )
    model = trainer.model
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    p.models.append(model)
    optimizer = primed_adamw(model)
    device, batch = p.device, p.batch
    prompt_ids = torch.tensor(p.prompts, device=device)
    completion_ids = torch.tensor(p.completions, device=device)
    old = p.old_logprobs[:, -completion_ids.shape[1] :]  # one sequence: its K columns are the completion
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": torch.ones_like(completion_ids),
        "advantages": p.advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": old,  # the iterative reference, as ours
        "num_items_in_batch": batch.mask.sum().to(device),
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = GRPOTrainer._compute_loss(trainer, model, inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def trl_liger(task: str, p: TrainProblem) -> Callable[[], None]:
    """`trl` with ``use_liger_kernel=True``."""
    return trl(task, p, liger=True)


def transformers_logits(task: str, p: TrainProblem) -> Callable[[], None]:
    """Plain transformers: the model's logits of the completion positions, fp32 ``log_softmax``, ``gather``,
    `rpg_kernels.rpg_loss`; backward, clipping, AdamW."""
    import rpg_kernels as rk
    from rpg_train.logprobs import autocast_context

    if task != "train-step":
        raise Skip("transformers runs the train-step task")
    model, config = p.model, loss_config()
    optimizer = primed_adamw(model)
    batch = p.batch.to(p.device)
    keep = batch.logits_to_keep

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(p.device, p.on_cuda):
            logits = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep + 1
            )
        logits = logits.logits[:, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(-1, batch.targets.clamp(min=0)[..., None])[..., 0]
        loss, _ = rk.rpg_loss(logprobs, p.old_logprobs, p.advantages, batch.mask, config=config)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


METHODS: dict[str, Callable[[str, TrainProblem], Callable[[], None]]] = {
    "ours": ours,
    "trl": trl,
    "trl-liger": trl_liger,
    "transformers": transformers_logits,
    **{name: _batching(name) for name in BATCHING_METHODS},
}
NOTES = {
    "ours": "rpg_train.update_policy: PolicyLoss, fused loss, no logits",
    "trl": "GRPOTrainer._compute_loss: TRL's chunked fused LM head",
    "trl-liger": "GRPOTrainer with use_liger_kernel=True (Liger's layer kernels)",
    "transformers": "[K, V] fp32 logits, log_softmax, gather, rpg_loss",
    "fixed": f"{MICRO_BATCH_SEQS} sequences per micro-batch",
    "token-budget": f"micro_batch_tokens = {MICRO_BATCH_SEQS} x the longest sequence allowed",
    "packed": "the same budget, rows packed without padding",
}


def resolve_method(name: str) -> Callable[[str, TrainProblem], Callable[[], None]]:
    """A method by name, or ``path/to/file.py:function``."""
    if name in METHODS:
        return METHODS[name]
    from bench.methods import resolve_method as resolve_file

    return resolve_file(name)


# --- padding without a model ---------------------------------------------------------------------------


def padding_rows(seeds: int = 20) -> list[dict]:
    """The padding fraction and micro-batch count of each micro-batching on the rpg preset's mini-batch of
    one rank of 8 (4 prompts x 16 completions), completions uniform in [1, 4096], prompts uniform in
    [32, 512] (one length per group): mean, min and max over ``seeds`` draws. No model runs."""
    from rpg_train.batching import plan_micro_batches
    from rpg_train.config import build_config

    cfg = build_config("rpg", overrides=["model.path=/m", "data.train_file=/d"])
    cap, budget = cfg.rollout.max_tokens, cfg.train.micro_batch_tokens
    groups = cfg.train.mini_batch_prompts // 8
    rows = groups * cfg.rollout.group_size
    settings = {
        "fixed": dict(micro_batch_tokens=0),
        "token-budget": dict(micro_batch_tokens=budget),
        "packed": dict(micro_batch_tokens=budget, packed=True),
    }
    out = []
    for name, options in settings.items():
        fractions, counts = [], []
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            prompts = torch.randint(32, 513, (groups,), generator=gen).repeat_interleave(
                cfg.rollout.group_size
            )
            lengths = prompts + torch.randint(1, cap + 1, (rows,), generator=gen)
            plan = plan_micro_batches(lengths, rows, micro_batch_seqs=cfg.train.micro_batch_seqs, **options)
            fractions.append(plan.padding_fraction)
            counts.append(len(plan.flat()))
        out.append(
            {
                "suite": "padding",
                "method": name,
                "shape": "rpg",  # the preset whose mini-batch and budget these are
                "n": cap,
                "rows": rows,
                "cap": cap,
                "micro_batch_seqs": cfg.train.micro_batch_seqs,
                "micro_batch_tokens": options["micro_batch_tokens"],
                "seeds": seeds,
                "padding_fraction": sum(fractions) / seeds,
                "padding_min": min(fractions),
                "padding_max": max(fractions),
                "micro_batches": sum(counts) / seeds,
                "status": "ok",
                "reason": "",
                "note": NOTES[name],
            }
        )
    return out


# --- rows ----------------------------------------------------------------------------------------------


def step_row(suite: str, method: str, shape: Shape, dtype: str, device: str, result, budget: int, probe: str):
    """One measured step (``suite`` train-step or micro-batching) as a results.json row."""
    extra = dict(result.extra)
    tokens = extra.get("tokens")
    time_ms = result.time_ms
    return {
        "suite": suite,
        "method": method,
        "shape": shape.name,
        "n": shape.n,
        "prompt": PROMPT_TOKENS if suite == "train-step" else None,
        "h": shape.h,
        "v": shape.v,
        "layers": MODELS.get(shape.name, {}).get("num_hidden_layers"),
        "dtype": dtype,
        "device": device,
        "status": result.status,
        "reason": result.reason,
        "note": NOTES.get(method, ""),
        "time_ms": time_ms,
        "times_ms": result.times_ms,
        "repeats": len(result.times_ms),
        "peak_mem_bytes": result.peak_mem_bytes,
        "over_limit": result.over_limit,
        "budget_bytes": budget,
        "within_budget": result.status == "ok"
        and result.peak_mem_bytes is not None
        and result.peak_mem_bytes <= budget,
        "tokens": tokens,
        "tokens_per_s": tokens / (time_ms * 1e-3) if tokens and time_ms else None,
        "probe": probe,
        "wall_s": round(result.wall_s, 2),
        **{k: v for k, v in extra.items() if k not in ("tokens",)},
    }


def fit_row(method: str, shape: Shape, dtype: str, device: str, budget: int, n_max: int, search) -> dict:
    """The longest completion that fits ``budget`` (the search's verdict) as a results.json row."""
    reason = search.reason
    if search.status == "ok" and search.max_n == 0:
        reason = f"even N={search.probes[0]['n']} does not fit {budget / 2**30:g} GiB"
    return {
        "suite": "train-step-fit",
        "method": method,
        "shape": shape.name,
        "h": shape.h,
        "v": shape.v,
        "prompt": PROMPT_TOKENS,
        "dtype": dtype,
        "device": device,
        "status": search.status,
        "reason": reason,
        "note": NOTES.get(method, ""),
        "budget_bytes": budget,
        "max_n": search.max_n,
        "capped": search.capped,
        "n_max": n_max,
        "peak_mem_bytes": search.peak_at_max,
        "probes": search.probes,
    }
