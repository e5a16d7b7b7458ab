"""The RL loop: rollout -> reward -> advantage -> old/ref log-probs -> loss -> optimizer step -> weight sync.

`train` reads top to bottom, in this order:

1. ranks, seeds, the output folder (refused if another run's checkpoints are in it: `rpg_train.outdir`),
   the SIGINT/SIGTERM handler (`rpg_train.interrupt`);
2. the task (`load_task`): model folder, tokenizer, prompts sharded by rank, reward function;
3. the policy (`build_policy`): the causal LM inside a `PolicyLoss`, wrapped by DDP or sharded by FSDP2
   (`rpg_train.parallel`), AdamW and its warm-up schedule, the reference policy;
4. resume from the newest checkpoint that loads (`resume_from`);
5. the rollout engine, which holds its own copy of the weights, synced in memory after every step;
6. the steps: `train_step` (rollouts -> rewards -> old and reference log-probs, the engine's beside them
   (`rpg_train.mismatch`) -> advantages -> `update_policy`, whose optimizer steps accumulate
   `forward_backward_step` over micro-batches -> weight sync), then metrics, evaluation and checkpoint;
   on a signal, the step is abandoned or finished and checkpointed (`rpg_train.interrupt`);
7. the summary and plot and the Hugging Face export ``out_dir/final/``; last (also after an error) the engine,
   the reward pool and the process group are closed.

One rollout step samples ``prompts_per_step`` prompts (split over ranks), ``group_size`` completions each,
scores them, and then takes ``prompts_per_step / mini_batch_prompts`` optimizer steps over mini-batches of the
rollouts, each accumulated over micro-batches of ``micro_batch_seqs`` sequences. Log-probs of the old
(sampling) policy come from the trainer's own model through the fused kernel (never logits); with the default
iterative reference they are also the reference (``ref_logprobs=None``).

Host syncs are deliberate: once per optimizer step (the finiteness check that guards the update), once per
rollout step for the metrics (and the mismatch metrics), and where a collective needs a number
(normalisers, evaluation, whether a rank was signalled to stop).

Run ``python -m rpg_train --preset tiny`` (CPU demo) or see docs/TRAINING.md for GPU runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import rpg_kernels as rk
from rpg_train import batching, checkpoint, distributed, interrupt, outdir, parallel
from rpg_train.config import Config, ConfigError, ConfigFileNotFound, config_differences, loss_config
from rpg_train.logprobs import PackedBatch, PolicyLoss, SequenceBatch, build_batch, sequence_logprobs
from rpg_train.metrics import (
    MetricsLog,
    ProgressBar,
    Reporter,
    check_reporter,
    plot_metrics,
    read_metrics,
    summarize,
    warn,
)
from rpg_train.mismatch import align_rollout_logprobs, mismatch_sums
from rpg_train.reference import ReferencePolicy
from rpg_train.seeds import derive_seed, rng_state, seed_everything, set_rng_state

if TYPE_CHECKING:
    from rpg_train.data import Prompt
    from rpg_train.rewards import RewardFn
    from rpg_train.rollout import RolloutEngine

LOSS_METRICS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the run stopped before the optimizer applied it."""


# ---------------------------------------------------------------------------------------------------------
# the task: model folder, prompts, reward


@dataclass
class Assets:
    model_dir: Path
    train_file: Path
    eval_file: Path | None
    reward_name: str


def resolve_assets(cfg: Config, info: distributed.DistInfo) -> Assets:
    """The run's model/data: user paths (checked; errors name the field) or the tiny generated ones."""
    if cfg.model.path is None:
        from rpg_train.tiny import build_tiny_assets

        # rank 0 writes them (transformers saves on the main process only), the others read its copy
        tiny = None
        if info.is_main:
            seed = cfg.train.seed if cfg.data.tiny_seed is None else cfg.data.tiny_seed
            tiny = build_tiny_assets(Path(cfg.train.out_dir) / "tiny", seed=seed)
            tiny = Assets(Path(tiny.model_dir), Path(tiny.train_file), Path(tiny.eval_file), tiny.reward_name)
        return distributed.broadcast_object(tiny, info)
    for field, value in (
        ("model.path", cfg.model.path),
        ("data.train_file", cfg.data.train_file),
        ("data.eval_file", cfg.data.eval_file),
    ):
        if value is not None and not Path(value).exists():
            raise ConfigFileNotFound(f"{field}: path does not exist: {value}")
    eval_file = Path(cfg.data.eval_file) if cfg.data.eval_file else None
    return Assets(Path(cfg.model.path), Path(cfg.data.train_file), eval_file, cfg.data.reward)


class PromptSampler:
    """Endless shuffled pass over this rank's prompts; ``position`` (prompts drawn) is its whole state."""

    def __init__(self, prompts: list, seed: int, rank: int) -> None:
        if not prompts:
            raise ConfigError("data.train_file: no prompts for this rank after sharding")
        self.prompts, self.seed, self.rank, self.position = prompts, seed, rank, 0
        self._epoch, self._permutation = -1, []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, "prompts", epoch, self.rank))
            self._epoch = epoch
            self._permutation = torch.randperm(len(self.prompts), generator=generator).tolist()
        return self._permutation

    def take(self, count: int) -> list:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[index]])
            self.position += 1
        return out


@dataclass
class Task:
    """What the run learns from: the model folder it starts from, this rank's prompts, the verifier."""

    model_dir: Path
    pad_id: int
    sampler: PromptSampler
    eval_prompts: list[Prompt]
    reward_fn: RewardFn


def load_task(cfg: Config, info: distributed.DistInfo) -> Task:
    """The model folder, this rank's train/eval prompts (tokenised, sharded) and the reward function."""
    from transformers import AutoTokenizer

    from rpg_train.data import check_prompt_lengths, load_prompts, shard
    from rpg_train.rewards import make_reward_fn

    assets = resolve_assets(cfg, info)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_kw = dict(
        prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key, chat_template=cfg.data.chat_template
    )
    r = cfg.rollout
    limit = r.max_model_len - r.max_tokens  # a prompt and its longest completion fit the engine's context
    why = f"rollout.max_model_len {r.max_model_len} - rollout.max_tokens {r.max_tokens}"

    def read(field: str, path: Path) -> list[Prompt]:
        """The file's prompts, each checked against ``limit`` now rather than at the step that samples it."""
        try:
            prompts = load_prompts(path, tokenizer, **data_kw)
            prompts, dropped = check_prompt_lengths(
                prompts, path, limit, drop=cfg.data.drop_long_prompts, why=why
            )
        except ValueError as err:
            hint = "" if "tokens, more than" not in str(err) else "; data.drop_long_prompts=true skips them"
            raise ConfigError(f"{field}: {err}{hint}") from None
        if dropped and info.is_main:
            print(f"rpg_train: {field}: dropped {dropped} prompt(s) longer than {limit} tokens ({why})")
        if not prompts:
            raise ConfigError(f"{field}: no prompt of {path} fits {limit} tokens ({why})")
        return prompts

    train_prompts = shard(read("data.train_file", assets.train_file), info.rank, info.world_size)
    eval_prompts = []
    if assets.eval_file is not None and cfg.train.eval_every > 0:
        eval_prompts = read("data.eval_file", assets.eval_file)[: cfg.train.eval_max_prompts]
        eval_prompts = shard(eval_prompts, info.rank, info.world_size)
    reward_kw = {"overlong_buffer": cfg.data.overlong_buffer} if cfg.data.overlong_buffer else {}
    return Task(
        model_dir=assets.model_dir,
        pad_id=pad_id,
        sampler=PromptSampler(train_prompts, cfg.train.seed, info.rank),
        eval_prompts=eval_prompts,
        reward_fn=make_reward_fn(assets.reward_name, **reward_kw),
    )


@dataclass
class Rollouts:
    """``G`` groups of ``group_size`` completions, flattened group-major."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    answers: list[str]
    rewards: torch.Tensor  # [G * group_size] float32
    logprobs: list[list[float] | None]  # the engine's, per completion token (None: the engine gave none)


def collect_rollouts(
    engine: RolloutEngine,
    sampler: PromptSampler,
    reward_fn: RewardFn,
    cfg: Config,
    num_groups: int,
    seed: int,
) -> tuple[Rollouts, dict[str, float]]:
    """Generate, score and (with dynamic sampling) keep groups whose rewards are not all equal."""
    n, max_tokens = cfg.rollout.group_size, cfg.rollout.max_tokens
    kept: list[tuple] = []  # (prompt, completions, rewards)
    dropped: list[tuple] = []
    tries = 1 + (cfg.algo.dynamic_sampling_max_tries if cfg.algo.dynamic_sampling else 0)
    for attempt in range(tries):
        prompts = sampler.take(num_groups - len(kept))
        outputs = engine.generate(
            [p.token_ids for p in prompts],
            n=n,
            max_tokens=max_tokens,
            temperature=cfg.rollout.temperature,
            seed=seed + attempt,
        )
        completions = [c for group in outputs for c in group]
        rewards = reward_fn(
            [c.text for c in completions],
            [p.answer for p in prompts for _ in range(n)],
            lengths=[len(c.token_ids) for c in completions],
            max_len=max_tokens,
        )
        for g, prompt in enumerate(prompts):
            group_rewards = rewards[g * n : (g + 1) * n]
            spread = max(group_rewards) - min(group_rewards)
            keep = not cfg.algo.dynamic_sampling or spread > 0
            (kept if keep else dropped).append((prompt, outputs[g], group_rewards))
        if len(kept) >= num_groups:
            break
    groups = (kept + dropped)[:num_groups]  # refill with all-equal groups (advantage 0) if sampling ran dry
    stats = (
        {"dynamic_sampling_kept": min(len(kept), num_groups) / num_groups}
        if cfg.algo.dynamic_sampling
        else {}
    )
    rollouts = Rollouts(
        prompt_ids=[p.token_ids for p, comps, _ in groups for _ in comps],
        completion_ids=[list(c.token_ids) for _, comps, _ in groups for c in comps],
        texts=[c.text for _, comps, _ in groups for c in comps],
        answers=[p.answer for p, comps, _ in groups for _ in comps],
        rewards=torch.tensor([r for *_, rs in groups for r in rs], dtype=torch.float32),
        logprobs=[getattr(c, "logprobs", None) for _, comps, _ in groups for c in comps],
    )
    return rollouts, stats


def is_correct(rewards: torch.Tensor) -> torch.Tensor:
    """A completion counts as correct when its reward is above 0.5 (rewards are 1 correct / 0 wrong)."""
    return (rewards > 0.5).float()


@torch.no_grad()
def evaluate(
    engine: RolloutEngine,
    prompts: list,
    reward_fn: RewardFn,
    cfg: Config,
    info: distributed.DistInfo,
    seed: int,
) -> float:
    """Accuracy mean@k on this rank's share of the held-out prompts, averaged over all ranks."""
    k, max_tokens = cfg.train.eval_samples, cfg.rollout.max_tokens
    outputs = (
        engine.generate(
            [p.token_ids for p in prompts],
            n=k,
            max_tokens=max_tokens,
            temperature=cfg.train.eval_temperature,
            seed=seed,
        )
        if prompts
        else []
    )
    completions = [c for group in outputs for c in group]
    rewards = (
        reward_fn(
            [c.text for c in completions],
            [p.answer for p in prompts for _ in range(k)],
            lengths=[len(c.token_ids) for c in completions],
            max_len=max_tokens,
        )
        if prompts
        else []
    )
    correct = float(is_correct(torch.tensor(rewards, dtype=torch.float32)).sum()) if prompts else 0.0
    return distributed.reduce_metrics({"acc": correct}, {"acc": float(len(completions))}, info).get(
        "acc", 0.0
    )


# ---------------------------------------------------------------------------------------------------------
# the policy: model + fused loss, DDP or FSDP, optimizer, schedule, reference


@dataclass
class Policy:
    """The trained policy and everything its checkpoint holds."""

    model: nn.Module  # the transformers causal LM (its parameters sharded in place under fsdp)
    loss: PolicyLoss  # model + fused loss: the root FSDP shards (and what log-probs are computed with)
    module: nn.Module  # what the loss's forward is called on: DDP(loss), or loss itself
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    reference: ReferencePolicy


def build_policy(cfg: Config, info: distributed.DistInfo, model_dir: Path) -> Policy:
    """The causal LM from ``model_dir`` inside a `PolicyLoss`, parallelised by ``train.parallel``, with AdamW
    (over the shards under fsdp), the linear warm-up schedule and the reference policy."""
    from transformers import AutoModelForCausalLM

    on_gpu = info.device.type == "cuda"
    bf16 = cfg.model.autocast_bf16 and on_gpu
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    attention = (
        {}
        if cfg.model.attn_implementation is None
        else {"attn_implementation": cfg.model.attn_implementation}
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **attention)
    except (ImportError, ValueError) as err:  # an attention transformers cannot use here (flash-attn absent)
        if not attention:
            raise
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation}: {err}") from None
    if cfg.train.parallel == "ddp":  # fsdp moves each group's shards to the device as it shards them
        model.to(info.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    backend = cfg.algo.loss_backend if cfg.algo.loss_backend != "auto" else ("triton" if on_gpu else "torch")
    head = dict(temperature=cfg.rollout.temperature, backend=backend, bf16=bf16)
    shard = dict(mode=cfg.train.parallel, info=info, bf16=bf16, offload=cfg.train.fsdp_offload)
    algo = cfg.algo
    reference = ReferencePolicy(  # copies the model before it is sharded
        model,
        algo.ref_update,
        algo.ref_update_k,
        algo.ref_kl_threshold,
        algo.ref_kl_ema,
        wrap=lambda frozen: parallel.parallelize(PolicyLoss(frozen, **head), trainable=False, **shard),
    )
    loss = PolicyLoss(model, loss_config(cfg), entropy_coef=algo.entropy_coef, **head)
    module = parallel.parallelize(loss, **shard)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    warmup = max(1, cfg.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return Policy(model, loss, module, optimizer, scheduler, reference)


def save_checkpoint(
    cfg: Config,
    info: distributed.DistInfo,
    policy: Policy,
    task: Task,
    step: int,
    rank_state: dict[str, Any] | None = None,
) -> Path:
    """Checkpoint ``step`` of the run (collective); see `rpg_train.checkpoint`. ``rank_state``: this
    rank's RNG states and data position when they are not the current ones (an abandoned step's start)."""
    trainer_state = {
        "scheduler": policy.scheduler.state_dict(),
        "reference": policy.reference.state_dict(),
        "config": cfg.to_dict(),
        "model_dir": str(task.model_dir),
        "world_size": info.world_size,
        "parallel": cfg.train.parallel,
        "device_type": info.device.type,
    }
    return checkpoint.save_checkpoint(
        cfg.train.out_dir,
        step,
        model=policy.model,
        optimizer=policy.optimizer,
        reference=policy.reference.model,
        trainer_state=trainer_state,
        rank_state=rank_state or {"rng": rng_state(), "data_position": task.sampler.position},
        keep=cfg.train.keep_checkpoints,
    )


def load_newest(cfg: Config, info: distributed.DistInfo, policy: Policy) -> tuple[Path, dict] | None:
    """``(path, trainer state)`` of the newest complete checkpoint that loads into ``policy``, falling back
    past those that do not (each named in a warning); None if there is none."""
    found = checkpoint.list_checkpoints(cfg.train.out_dir)
    for path in reversed(found):
        error = None
        try:
            trainer = checkpoint.load_checkpoint(
                path, model=policy.model, optimizer=policy.optimizer, reference=policy.reference.model
            )
        except checkpoint.UnreadableCheckpoint as err:
            error = err
        # every rank moves on together (a collective): a checkpoint counts only if it loaded on all of them
        if not distributed.broadcast_flag(error is not None, info):
            return path, trainer
        if info.is_main:
            warn(f"--resume: {error or f'{path} does not load on another rank'}; trying the previous one")
    if found:
        raise checkpoint.UnreadableCheckpoint(
            f"--resume: none of the {len(found)} checkpoints under "
            f"{checkpoint.checkpoint_dir(cfg.train.out_dir)} loads (see the warnings above)"
        )
    return None


def resume_from(cfg: Config, info: distributed.DistInfo, policy: Policy, task: Task) -> int:
    """Load the newest checkpoint of ``train.out_dir`` that loads (if any); returns its step (0 if none).

    With the number of ranks it was written by, the run continues exactly as if uninterrupted (every rank
    gets back its RNG states and data position). With another, DCP reshards the weights and optimizer
    states, and the prompt order and random streams restart from derived seeds (announced). A config that
    changes the training from the checkpoint's (seed, lr, group size, ...) is named in a warning.
    """
    newest = load_newest(cfg, info, policy)
    if newest is None:
        if info.is_main:
            print(
                f"--resume: no checkpoint under {checkpoint.checkpoint_dir(cfg.train.out_dir)}; from step 0"
            )
        return 0
    path, trainer = newest
    changed = config_differences(trainer.get("config", {}), cfg)
    if changed and info.is_main:
        warn(
            f"--resume: this run's config differs from the one {path.name} was trained with: "
            f"{'; '.join(changed)}. The run goes on with the new values (not as the original run would)."
        )
    policy.scheduler.load_state_dict(trainer["scheduler"])
    policy.reference.load_state_dict(trainer["reference"])
    ranks = trainer["ranks"]
    if len(ranks) == info.world_size:
        set_rng_state(ranks[info.rank]["rng"])
        task.sampler.position = ranks[info.rank]["data_position"]
    else:
        if info.is_main:
            print(
                f"--resume: {path} was written by {len(ranks)} ranks, this run has {info.world_size}: "
                "weights and optimizer states resharded; prompt order and random streams differ from an "
                "uninterrupted run"
            )
        task.sampler.position = sum(r["data_position"] for r in ranks) // info.world_size
        seed_everything(derive_seed(cfg.train.seed, "resharded", trainer["step"], info.rank))
    return trainer["step"]


def make_engine(cfg: Config, info: distributed.DistInfo, task: Task, policy: Policy) -> RolloutEngine:
    """This rank's rollout engine (vLLM, or the transformers fallback) for the run's model."""
    from rpg_train.rollout import make_rollout_engine

    return make_rollout_engine(
        task.model_dir,
        backend=cfg.rollout.backend,
        dtype="bfloat16" if info.device.type == "cuda" else "float32",
        max_model_len=cfg.rollout.max_model_len,
        seed=derive_seed(cfg.train.seed, "engine", info.rank),
        gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        sleep_mode=cfg.rollout.sleep_between_steps,
        # the hf engine samples with the trainer's module itself when it is whole; vLLM loads model_dir
        model=None if parallel.is_sharded(policy.model) else policy.model,
    )


# ---------------------------------------------------------------------------------------------------------
# one rollout step


def mini_batch_num_items(
    agg: str, mask: Tensor, mini_batches: list[slice], info: distributed.DistInfo
) -> list[float]:
    """Each mini-batch's ``num_items`` on this rank: the global normaliser / world_size (DDP and FSDP
    average gradients over ranks), for all mini-batches in one collective.

    Token count for ``token-mean``; sequence count for the ``seq-mean-*`` modes. For
    ``seq-mean-token-sum-norm`` the per-micro-batch token dim is folded in later (see ``micro_num_items``).
    """
    per_row = mask.sum(1) if agg == "token-mean" else (mask.sum(1) > 0).float()
    local = [float(per_row[rows].sum()) for rows in mini_batches]  # a CPU mask: no device sync
    return [total / info.world_size for total in distributed.all_reduce_sums(local, info)]


def micro_num_items(
    loss_config: rk.LossConfig, num_items: float, micro: SequenceBatch, max_tokens: int
) -> float:
    """``num_items`` of one micro-batch: the mini-batch's. Dr. GRPO's ``seq-mean-token-sum-norm`` divides by
    ``S * L``: with ``LossConfig.max_completion_length`` unset (a loss config built by hand; `build_policy`
    sets it to ``rollout.max_tokens``), ``L`` is the micro-batch's width ``K``, folded in here."""
    if loss_config.agg == "seq-mean-token-sum-norm" and loss_config.max_completion_length is None:
        return num_items * max_tokens / micro.logits_to_keep
    return num_items


def micro_batch_plan(
    cfg: Config, info: distributed.DistInfo, policy: Policy, batch: SequenceBatch
) -> batching.MicroBatchPlan:
    """The micro-batches of this rank's rollouts (`rpg_train.batching`): mini-batches of
    ``mini_batch_prompts / world`` groups, cut by ``train.micro_batch_tokens`` (or ``micro_batch_seqs``),
    packed where ``train.packing`` says; the same number on every rank."""
    rows_per_step = cfg.train.mini_batch_prompts // info.world_size * cfg.rollout.group_size
    prefix = batch.input_ids.shape[1] - batch.logits_to_keep
    return batching.plan_micro_batches(
        batch.attention_mask.sum(1),
        rows_per_step,
        micro_batch_seqs=cfg.train.micro_batch_seqs,
        micro_batch_tokens=cfg.train.micro_batch_tokens,
        packed=batching.packing_enabled(cfg.train.packing, policy.model),
        min_width=prefix + 1,
        info=info,
    )


def forward_backward_step(
    module: nn.Module,
    micro: SequenceBatch | PackedBatch,
    old_logprobs: Tensor,
    advantages: Tensor,
    ref_logprobs: Tensor | None,
    *,
    num_items: float,
    sync: bool,
    rollout_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward of one micro-batch (padded or packed): the loss is computed inside ``module``'s
    forward (DDP's or FSDP's hooks run around it); ``sync`` on the mini-batch's last micro-batch. Returns the
    detached loss and the loss metrics (device tensors: no host sync here)."""
    with parallel.grad_sync(module, sync):
        loss, metrics = module(
            micro,
            old_logprobs,
            advantages,
            ref_logprobs,
            num_items=num_items,
            rollout_logprobs=rollout_logprobs,
        )
        loss.backward()
    return loss.detach(), metrics


@dataclass
class UpdateStats:
    loss: float  # global loss, mean over the optimizer steps
    grad_norm: float  # of the last optimizer step, before clipping
    sums: dict[str, float]  # token-weighted sums of the loss metrics on this rank
    tokens: float  # this rank's completion tokens
    real_tokens: int = 0  # this rank's prompt + completion tokens through the forward/backward passes
    computed_tokens: int = 0  # the tokens the backbone computed for them, padding included
    seconds: float = 0.0  # wall time of the update


def update_policy(
    policy: Policy,
    cfg: Config,
    info: distributed.DistInfo,
    batch: SequenceBatch,
    old_logprobs: Tensor,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    plan: batching.MicroBatchPlan | None = None,
    rollout_logprobs: Tensor | None = None,
) -> UpdateStats:
    """Optimizer steps over this rank's rollouts: ``mini_batch_prompts / world`` groups per step.

    ``batch`` stays on the CPU (micro-batches are cut, and packed, there and moved); ``old_logprobs``,
    ``ref_logprobs`` ``[B, K]`` and ``advantages`` ``[B]`` or ``[B, K]`` live on the device. Each mini-batch's
    gradient is accumulated over the micro-batches of ``plan`` (default `micro_batch_plan`: token budgets or
    ``micro_batch_seqs`` sequences), with the GLOBAL normaliser (all ranks' tokens) so that the ranks'
    gradient average equals the full-batch gradient whatever the micro-batches. A non-finite loss or gradient
    raises `TrainingDiverged` before the step is applied. ``rollout_logprobs`` ``[B, K]`` (the engine's, on
    the device) go to the loss when it applies the rollout correction.
    """
    begin = time.perf_counter()
    device, loss_config = old_logprobs.device, policy.loss.loss_config
    plan = micro_batch_plan(cfg, info, policy, batch) if plan is None else plan
    sums: dict[str, Tensor] = {}
    tokens, loss_total = 0.0, torch.zeros((), dtype=torch.float64, device=device)  # sums in float64
    normalisers = mini_batch_num_items(loss_config.agg, batch.mask, plan.mini_batches, info)
    for micros, num_items in zip(plan.micro_batches, normalisers):
        step_loss = torch.zeros((), dtype=torch.float64, device=device)
        for k, micro_rows in enumerate(micros):
            micro = batch.select(micro_rows)
            width, index = micro.logits_to_keep, micro_rows.to(device)
            loss, metrics = forward_backward_step(
                policy.module,
                (micro.pack() if plan.packed else micro).to(device),
                old_logprobs[index, :width],
                advantages[index],
                None if ref_logprobs is None else ref_logprobs[index, :width],
                num_items=micro_num_items(loss_config, num_items, micro, cfg.rollout.max_tokens),
                sync=k == len(micros) - 1,
                rollout_logprobs=None if rollout_logprobs is None else rollout_logprobs[index, :width],
            )
            step_loss += loss
            micro_tokens = float(micro.mask.sum())  # the CPU mask: no device sync
            tokens += micro_tokens
            for key in LOSS_METRICS:
                if key in metrics:
                    sums[key] = sums.get(key, 0.0) + metrics[key].detach() * micro_tokens
        grad_norm = parallel.clip_grad_norm_(policy.model.parameters(), cfg.optim.grad_clip)
        # host sync, once per optimizer step: a non-finite loss or gradient on any rank must not be applied
        finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
        if distributed.broadcast_flag(not finite, info):
            policy.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"non-finite {'gradient norm' if math.isfinite(float(step_loss)) else 'loss'} "
                f"(loss {float(step_loss):.4g}, grad norm {float(grad_norm):.4g}); the update was not "
                "applied. Lower optim.lr or check the data."
            )
        policy.optimizer.step()
        policy.scheduler.step()
        policy.optimizer.zero_grad(set_to_none=True)
        loss_total += step_loss
        step_kl = None
        if policy.reference.needs_kl:  # a host sync and a collective only for the kl_threshold rule
            step_kl = distributed.reduce_metrics({"kl": float(sums.get("kl", 0.0))}, {"kl": tokens}, info)
            step_kl = step_kl.get("kl", 0.0)
        policy.reference.after_optimizer_step(policy.model, step_kl)
    # the per-rank losses sum to world_size x the global loss (num_items is global / world_size)
    loss = distributed.all_reduce_sum(float(loss_total), info) / info.world_size / len(plan.mini_batches)
    return UpdateStats(
        loss,
        float(grad_norm),
        {k: float(v) for k, v in sums.items()},
        tokens,
        real_tokens=plan.real_tokens,
        computed_tokens=plan.computed_tokens,
        seconds=time.perf_counter() - begin,
    )


def compute_advantages(
    cfg: Config, rewards: Tensor, mask: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None
) -> Tensor:
    """rpg: reward minus its group's mean (no std division); reinforce_pp: token returns with the KL in
    the reward; the other estimators of `rpg_kernels.compute_advantages` by name."""
    if cfg.algo.advantage == "reinforce_pp":
        return rk.compute_advantages(
            "reinforce_pp",
            rewards,
            cfg.rollout.group_size,
            mask=mask,
            old_logprobs=old_logprobs,
            ref_logprobs=old_logprobs if ref_logprobs is None else ref_logprobs,
            beta_kl=cfg.algo.reward_kl_beta,
        )
    return rk.compute_advantages(cfg.algo.advantage, rewards, cfg.rollout.group_size)


def rollout_logprobs_of(
    rollouts: Rollouts, batch: SequenceBatch, correction: rk.LossConfig, engine: RolloutEngine
) -> Tensor:
    """The engine's log-probs aligned with ``batch`` (`rpg_train.mismatch.align_rollout_logprobs`); the
    rollout correction cannot do without them."""
    if correction.rollout_is is not None and any(lp is None for lp in rollouts.logprobs):
        raise RuntimeError(
            f"algo.rollout_correction={correction.rollout_is} needs the engine's per-token log-probs; "
            f"{type(engine).__name__} gave none"
        )
    return align_rollout_logprobs(batch.mask, rollouts.logprobs)


def train_step(
    cfg: Config,
    info: distributed.DistInfo,
    policy: Policy,
    engine: RolloutEngine,
    task: Task,
    step: int,
) -> dict[str, Any]:
    """One rollout step, the optimizer steps it feeds and the weight sync; returns its metrics record
    (reduced over ranks). Raises `TrainingDiverged` before applying a non-finite update."""
    step_start = time.perf_counter()
    # until the first optimizer step the policy is the previous step's: a signal may abandon the step
    interrupt.mark("step")

    # rollouts from the engine, scored by the verifier (dynamic sampling drops all-equal groups)
    engine.wake()
    groups = cfg.train.prompts_per_step // info.world_size
    seed = derive_seed(cfg.train.seed, "rollout", step, info.rank)
    rollouts, stats = collect_rollouts(engine, task.sampler, task.reward_fn, cfg, groups, seed)
    engine.sleep()
    rollout_time = time.perf_counter() - step_start

    # old (= sampling policy) log-probs from the trainer's model, and the reference's if it is separate
    batch = build_batch(rollouts.prompt_ids, rollouts.completion_ids, task.pad_id)  # CPU; moved per micro
    plan, device = (
        micro_batch_plan(cfg, info, policy, batch),
        info.device,
    )  # the same micro-batches throughout
    policy.loss.eval()
    old_logprobs, entropy = sequence_logprobs(policy.loss, batch, plan=plan, device=device)
    ref_logprobs = None
    if not policy.reference.is_old_policy:
        ref_logprobs, _ = sequence_logprobs(policy.reference.model, batch, plan=plan, device=device)
    policy.loss.train()

    # the engine's log-probs of the same tokens beside the trainer's: the mismatch (logged every step), and
    # the rollout correction's input when algo.rollout_correction is set
    correction = policy.loss.loss_config
    rollout_logprobs = rollout_logprobs_of(rollouts, batch, correction, engine).to(device)
    mismatch, mismatch_counts, mismatch_max = mismatch_sums(
        old_logprobs, rollout_logprobs, batch.mask.to(device), correction
    )

    # advantages, then optimizer steps over mini-batches, gradients accumulated over micro-batches
    rewards, mask = rollouts.rewards.to(device), batch.mask.to(device)
    advantages = compute_advantages(cfg, rewards, mask, old_logprobs, ref_logprobs)
    interrupt.mark("finish")  # from here on the step changes the policy: a signal lets it finish
    update = update_policy(
        policy,
        cfg,
        info,
        batch,
        old_logprobs,
        ref_logprobs,
        advantages,
        plan,
        rollout_logprobs=rollout_logprobs if correction.rollout_is is not None else None,
    )

    # push the new weights to the rollout engine (in memory; gathered one parameter at a time under fsdp)
    engine.wake()
    engine.sync_weights(policy.model)
    engine.sleep()

    # metrics, reduced over ranks (the step's host sync)
    step_time = time.perf_counter() - step_start
    tokens = float(batch.mask.sum())
    sums = {
        "reward": float(rollouts.rewards.sum()),
        "accuracy": float(is_correct(rollouts.rewards).sum()),
        "response_length": tokens,
        "entropy": float((entropy * mask).sum()),
        **update.sums,
        **stats,
        **mismatch,
        "padding_frac": float(update.computed_tokens - update.real_tokens),  # of the update's micro-batches
        "train_tokens_per_s": float(update.real_tokens),  # over all ranks: sum of tokens / mean update time
    }
    counts = {
        "reward": len(rewards),
        "accuracy": len(rewards),
        "response_length": len(rewards),
        "entropy": tokens,
        **{k: update.tokens for k in update.sums},
        **{k: 1.0 for k in stats},
        **mismatch_counts,
        "padding_frac": float(update.computed_tokens),
        "train_tokens_per_s": update.seconds / info.world_size,
    }
    record = {"step": step + 1, **distributed.reduce_metrics(sums, counts, info)}
    record["loss"], record["grad_norm"] = update.loss, update.grad_norm
    record["lr"] = policy.scheduler.get_last_lr()[0]
    record["tokens_per_s"] = distributed.all_reduce_sum(tokens, info) / step_time
    record["rollout_s"], record["step_s"] = rollout_time, step_time
    mismatch_max = distributed.reduce_max(mismatch_max, info)
    if "mismatch_kl" in record:  # some rank had engine log-probs
        record["mismatch_abs_max"] = mismatch_max
    if policy.reference.updates:
        record["ref_updates"] = policy.reference.updates
    return record


# ---------------------------------------------------------------------------------------------------------
# the run


def check_batch_sizes(cfg: Config, world: int) -> None:
    for name, value in (
        ("train.prompts_per_step", cfg.train.prompts_per_step),
        ("train.mini_batch_prompts", cfg.train.mini_batch_prompts),
    ):
        if value % world:
            raise ConfigError(f"{name} ({value}) must be a multiple of the number of ranks ({world})")


def summarize_run(
    cfg: Config, out_dir: Path, loss_config: rk.LossConfig, last: Path | None
) -> dict[str, Any]:
    """Rank 0: ``summary.json`` and ``metrics.png`` from ``metrics.jsonl`` (this run's: the folder holds no
    other run's, `rpg_train.outdir`) and ``last``, the checkpoint it wrote last; prints the summary line."""
    records = read_metrics(out_dir / "metrics.jsonl")
    summary: dict[str, Any] = summarize(records)
    plot = plot_metrics(records, out_dir / "metrics.png", title=f"{cfg.algo.loss} ({loss_config.kl or ''})")
    summary["plot"] = str(plot) if plot else None
    summary["checkpoint"] = str(last) if last else None
    if cfg.train.export:
        summary["final"] = str(out_dir / "final")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        "rpg_train summary: "
        + ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
            for k, v in summary.items()
        )
    )
    return summary


def train(
    cfg: Config,
    *,
    resume: bool = False,
    overwrite: bool = False,
    engine: RolloutEngine | None = None,
) -> dict[str, Any]:
    """Run the configured training (steps 1-7 of the module docstring); returns the summary (rank 0; {}
    elsewhere). ``resume`` continues the run in ``train.out_dir``; ``overwrite`` deletes it first (without
    either, a folder holding checkpoints is refused). ``engine`` replaces the rollout engine; its caller
    keeps it (and closes it). Raises `rpg_train.interrupt.Interrupted` after a SIGINT/SIGTERM."""
    from rpg_train.export import export_checkpoint

    # 1. ranks, seeds, the output folder (this run's alone), the signal handler
    out_dir = Path(cfg.train.out_dir)
    outdir.check_out_dir(out_dir, resume=resume, overwrite=overwrite)
    check_reporter(cfg.train.report_to)
    info = distributed.setup(cfg.train.device, group_for_one_rank=cfg.train.parallel == "fsdp")
    check_batch_sizes(cfg, info.world_size)
    seed_everything(derive_seed(cfg.train.seed, "global", info.rank))
    distributed.barrier(info)  # every rank has looked at the folder before rank 0 deletes anything
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for note in outdir.claim_out_dir(out_dir, resume=resume, overwrite=overwrite):
            print(f"rpg_train: {note}")
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    distributed.barrier(info)
    summary: dict[str, Any] = {}
    with contextlib.ExitStack() as closing:  # closed in reverse order, also after an error
        closing.callback(distributed.teardown)
        # a signal stops at a step boundary with a checkpoint (one process may abandon a step that has not
        # changed the policy yet; ranks must agree where they stop, so they finish it)
        stop = closing.enter_context(interrupt.StopRequest(abandon_steps=not info.enabled))

        # 2. the task: model folder, prompts (their lengths checked), reward function (its pool)
        task = load_task(cfg, info)
        closing.callback(task.reward_fn.close)

        # 3. the policy: model + fused loss under DDP or FSDP, optimizer, schedule, reference
        policy = build_policy(cfg, info, task.model_dir)

        # 4. resume
        start_step = resume_from(cfg, info, policy, task) if resume else 0
        last_saved = checkpoint.checkpoint_dir(out_dir) / f"step-{start_step:08d}" if start_step else None

        # 5. the rollout engine (its own copy of the weights; synced from the trainer, never via disk)
        if engine is None:
            engine = make_engine(cfg, info, task, policy)
            closing.callback(engine.close)  # first to close: vLLM tears down the groups it joined
        if start_step > 0:
            engine.sync_weights(policy.model)

        # 6. the steps: train_step, then metrics, eval, checkpoint
        log = MetricsLog(out_dir, enabled=info.is_main, resume_step=start_step)
        reporter = Reporter(
            cfg.train.report_to,
            out_dir,
            enabled=info.is_main,
            config=cfg.to_dict(),
            resume_step=start_step,
            project=cfg.train.wandb_project,
        )
        closing.callback(reporter.close)
        bar = ProgressBar(
            cfg.train.steps,
            initial=start_step,
            enabled=info.is_main,
            bar=cfg.train.progress,
            log_every=cfg.train.log_every,
        )
        if info.is_main:
            bar.write(
                f"rpg_train: {info.world_size} rank(s), {cfg.train.parallel} on {info.device}, out {out_dir}"
            )
        eval_seed = derive_seed(cfg.train.seed, "eval")
        if start_step == 0 and task.eval_prompts:
            accuracy = evaluate(engine, task.eval_prompts, task.reward_fn, cfg, info, eval_seed)
            log.log({"step": 0, "eval_accuracy": accuracy})
            reporter.log({"step": 0, "eval_accuracy": accuracy})
        # a first signal in here is noted and honoured after the step (train_step marks its part before the
        # first optimizer step, where a signal abandons the step instead)
        with stop.region("finish"):
            for step in range(start_step, cfg.train.steps):
                # what a checkpoint of the previous step holds for this rank, should this step be abandoned
                step_start = {"rng": rng_state(), "data_position": task.sampler.position}
                try:
                    record = train_step(cfg, info, policy, engine, task, step)
                except TrainingDiverged as err:
                    good = last_saved or "none written yet"
                    raise TrainingDiverged(f"step {step + 1}: {err} Last good checkpoint: {good}.") from None
                except interrupt.StepAbandoned as abandoned:
                    # before its update, the policy is still the previous step's: checkpoint that
                    if abandoned.before_update and step > saved_step(last_saved):
                        last_saved = save_checkpoint(cfg, info, policy, task, step, rank_state=step_start)
                    raise _interrupted(abandoned.signum, step + 1, last_saved, "abandoned", info) from None
                done = step + 1
                if task.eval_prompts and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
                    record["eval_accuracy"] = evaluate(
                        engine, task.eval_prompts, task.reward_fn, cfg, info, eval_seed
                    )
                log.log(record)
                reporter.log(record)
                bar.update(record)
                every = cfg.train.checkpoint_every
                if (every and done % every == 0) or done == cfg.train.steps:
                    last_saved = save_checkpoint(cfg, info, policy, task, done)
                # host sync and a collective, once per step: whether any rank was signalled
                if stop.agreed(info):
                    if saved_step(last_saved) != done:
                        last_saved = save_checkpoint(cfg, info, policy, task, done)
                    raise _interrupted(stop.signum or signal.SIGINT, done, last_saved, "finished", info)
        bar.close()

        # 7. summary, plot, the Hugging Face export (rank 0, from the checkpoint this run wrote last)
        if info.is_main:
            if cfg.train.export:
                final = export_checkpoint(last_saved, out_dir / "final", dtype=cfg.train.export_dtype)
                print(f"rpg_train: exported {final}")
            summary = summarize_run(cfg, out_dir, policy.loss.loss_config, last_saved)
        distributed.barrier(info)
    return summary


def saved_step(path: Path | None) -> int:
    """The step of checkpoint ``path`` (0 for None: nothing written)."""
    return checkpoint.step_of(path) if path is not None else 0


def _interrupted(
    signum: int, step: int, last: Path | None, how: str, info: distributed.DistInfo
) -> interrupt.Interrupted:
    """The `Interrupted` to raise (its message printed by rank 0): where to resume from."""
    where = f"checkpoint {last} (continue with --resume)" if last else "no checkpoint (nothing was trained)"
    message = f"{signal.Signals(signum).name}: step {step} {how}; stopped with {where}"
    if info.is_main:
        print(f"rpg_train: {message}", flush=True)
    return interrupt.Interrupted(signum, str(last) if last else None, message)
