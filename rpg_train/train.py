"""The RL loop, top to bottom: rollout -> reward -> advantage -> old/ref log-probs -> loss -> step -> sync.

One rollout step ("step") samples ``prompts_per_step`` prompts (split over ranks), ``group_size``
completions each, scores them, and then takes ``prompts_per_step / mini_batch_prompts`` optimizer steps
over mini-batches of the rollouts, each accumulated over micro-batches of ``micro_batch_seqs`` sequences.
Log-probs of the old (sampling) policy come from the trainer's own model through the fused kernel (never
logits); with the default iterative reference they are also the reference (``ref_logprobs=None``).

Run ``python -m rpg_train --preset tiny`` (CPU demo) or see docs/TRAINING.md for GPU runs.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import rpg_kernels as rk
from rpg_train import checkpoint, distributed
from rpg_train.config import Config
from rpg_train.logprobs import SequenceBatch, build_batch, policy_loss, sequence_logprobs
from rpg_train.metrics import MetricsLog, ProgressBar, plot_metrics, read_metrics, summarize
from rpg_train.reference import ReferencePolicy

if TYPE_CHECKING:
    from rpg_train.rewards import RewardFn
    from rpg_train.rollout import RolloutEngine

LOSS_METRICS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean")


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the run stopped before the optimizer applied it."""


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
            raise FileNotFoundError(f"{field}: path does not exist: {value}")
    eval_file = Path(cfg.data.eval_file) if cfg.data.eval_file else None
    return Assets(Path(cfg.model.path), Path(cfg.data.train_file), eval_file, cfg.data.reward)


class PromptSampler:
    """Endless shuffled pass over this rank's prompts; ``position`` (prompts drawn) is its whole state."""

    def __init__(self, prompts: list, seed: int, rank: int) -> None:
        if not prompts:
            raise ValueError("data.train_file: no prompts for this rank after sharding")
        self.prompts, self.seed, self.rank, self.position = prompts, seed, rank, 0

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch * 1_009 + self.rank)
        return torch.randperm(len(self.prompts), generator=generator).tolist()

    def take(self, count: int) -> list:
        out = []
        for _ in range(count):
            epoch, index = divmod(self.position, len(self.prompts))
            out.append(self.prompts[self._order(epoch)[index]])
            self.position += 1
        return out


@dataclass
class Rollouts:
    """``G`` groups of ``group_size`` completions, flattened group-major."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    texts: list[str]
    answers: list[str]
    rewards: torch.Tensor  # [G * group_size] float32


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


def global_num_items(agg: str, mask: torch.Tensor, info: distributed.DistInfo) -> float:
    """This rank's ``num_items`` for a mini-batch: the global normaliser / world_size (DDP averages grads).

    Token count for ``token-mean``; sequence count for the ``seq-mean-*`` modes. For
    ``seq-mean-token-sum-norm`` the per-micro-batch token dim is folded in later (see ``micro_num_items``).
    """
    local = float(mask.sum()) if agg == "token-mean" else float((mask.sum(1) > 0).sum())
    return distributed.all_reduce_sum(local, info) / info.world_size


def micro_num_items(agg: str, num_items: float, micro: SequenceBatch, max_tokens: int) -> float:
    """Dr. GRPO's constant normaliser ``S * max_tokens`` although micro-batches differ in width ``K``."""
    if agg == "seq-mean-token-sum-norm":
        return num_items * max_tokens / micro.logits_to_keep
    return num_items


@dataclass
class UpdateStats:
    loss: float  # global loss, mean over the optimizer steps
    grad_norm: float  # of the last optimizer step, before clipping
    sums: dict[str, float]  # token-weighted sums of the loss metrics on this rank
    tokens: float  # this rank's completion tokens


def update_policy(
    policy: torch.nn.Module,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    reference: ReferencePolicy,
    loss_config: rk.LossConfig,
    cfg: Config,
    info: distributed.DistInfo,
    batch: SequenceBatch,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    backend: str = "auto",
    bf16: bool = False,
) -> UpdateStats:
    """Optimizer steps over this rank's rollouts: ``mini_batch_prompts / world`` groups per step.

    Each mini-batch's gradient is accumulated over micro-batches of ``micro_batch_seqs`` sequences, with the
    GLOBAL normaliser (all ranks' tokens) so that DDP's gradient average equals the full-batch gradient.
    ``policy`` is ``model`` or its DDP wrapper. A non-finite loss or gradient raises before the step.
    """
    group_size, world = cfg.rollout.group_size, info.world_size
    rows_per_step = cfg.train.mini_batch_prompts // world * group_size
    sums: dict[str, float] = {}
    tokens = loss_total = 0.0
    grad_norm = torch.zeros(())
    mini_starts = range(0, len(batch), rows_per_step)
    for mini_start in mini_starts:
        rows = torch.arange(mini_start, min(mini_start + rows_per_step, len(batch)))
        num_items = global_num_items(loss_config.agg, batch.mask[rows], info)
        micro_starts = range(0, len(rows), cfg.train.micro_batch_seqs)
        finite = True
        for start in micro_starts:
            micro_rows = rows[start : start + cfg.train.micro_batch_seqs]
            micro = batch.select(micro_rows)
            width = micro.logits_to_keep
            last = start == micro_starts[-1]
            # DDP all-reduces gradients on the last micro-batch's backward only
            with contextlib.nullcontext() if last or not info.enabled else policy.no_sync():
                loss, metrics = policy_loss(
                    policy,
                    micro,
                    old_logprobs[micro_rows, :width],
                    advantages[micro_rows],
                    None if ref_logprobs is None else ref_logprobs[micro_rows, :width],
                    loss_config,
                    num_items=micro_num_items(loss_config.agg, num_items, micro, cfg.rollout.max_tokens),
                    temperature=cfg.rollout.temperature,
                    entropy_coef=cfg.algo.entropy_coef,
                    backend=backend,
                    bf16=bf16,
                )
                loss.backward()
            finite &= bool(torch.isfinite(loss.detach()))
            micro_tokens = float(micro.mask.sum())
            tokens += micro_tokens
            loss_total += float(loss.detach())
            for key in LOSS_METRICS:
                if key in metrics:
                    sums[key] = sums.get(key, 0.0) + float(metrics[key]) * micro_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if distributed.broadcast_flag(not (finite and bool(torch.isfinite(grad_norm))), info):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"non-finite {'loss' if not finite else 'gradient norm'} (loss {float(loss.detach()):.4g}, "
                f"grad norm {float(grad_norm):.4g}); the update was not applied."
                " Lower optim.lr or check the data."
            )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step_kl = distributed.reduce_metrics({"kl": sums.get("kl", 0.0)}, {"kl": tokens}, info).get("kl", 0.0)
        reference.after_optimizer_step(model, step_kl)
    # the per-rank losses sum to world_size x the global loss (num_items is global / world_size)
    loss = distributed.all_reduce_sum(loss_total, info) / world / len(mini_starts)
    return UpdateStats(loss=loss, grad_norm=float(grad_norm), sums=sums, tokens=tokens)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config, *, resume: bool = False, engine: RolloutEngine | None = None) -> dict[str, Any]:
    """Run the configured training; returns the final summary. ``engine`` overrides the rollout engine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rpg_train.data import load_prompts, shard
    from rpg_train.rewards import make_reward_fn
    from rpg_train.rollout import VLLMEngine, make_rollout_engine

    # ---- set-up: ranks, seeds, output folder --------------------------------------------------------
    info = distributed.setup(cfg.train.device)
    world = info.world_size
    for name, value in (
        ("train.prompts_per_step", cfg.train.prompts_per_step),
        ("train.mini_batch_prompts", cfg.train.mini_batch_prompts),
    ):
        if value % world:
            raise ValueError(f"{name} ({value}) must be a multiple of the number of ranks ({world})")
    set_seed(cfg.train.seed * 1_000 + info.rank)
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        (out_dir / "config.yaml").write_text(cfg.to_yaml())
    device, on_gpu = info.device, info.device.type == "cuda"
    bf16 = cfg.model.autocast_bf16 and on_gpu
    backend = cfg.algo.loss_backend if cfg.algo.loss_backend != "auto" else ("triton" if on_gpu else "torch")

    # ---- model, tokenizer, data, reward --------------------------------------------------------------
    assets = resolve_assets(cfg, info)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=dtype).to(device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data_kw = dict(
        prompt_key=cfg.data.prompt_key, answer_key=cfg.data.answer_key, chat_template=cfg.data.chat_template
    )
    train_prompts = shard(load_prompts(assets.train_file, tokenizer, **data_kw), info.rank, world)
    eval_prompts = []
    if assets.eval_file is not None and cfg.train.eval_every > 0:
        eval_prompts = load_prompts(assets.eval_file, tokenizer, **data_kw)[: cfg.train.eval_max_prompts]
        eval_prompts = shard(eval_prompts, info.rank, world)
    reward_kw = {"overlong_buffer": cfg.data.overlong_buffer} if cfg.data.overlong_buffer else {}
    reward_fn = make_reward_fn(assets.reward_name, **reward_kw)
    sampler = PromptSampler(train_prompts, cfg.train.seed, info.rank)

    # ---- optimizer, schedule, loss, reference, DDP ---------------------------------------------------
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=tuple(cfg.optim.betas)
    )
    warmup = max(1, cfg.optim.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    loss_config = rk.LossConfig.preset(cfg.algo.loss, **cfg.algo.loss_overrides)
    reference = ReferencePolicy(
        model, cfg.algo.ref_update, cfg.algo.ref_update_k, cfg.algo.ref_kl_threshold, cfg.algo.ref_kl_ema
    )
    policy = DistributedDataParallel(model) if info.enabled else model

    # ---- resume --------------------------------------------------------------------------------------
    start_step = 0
    last_checkpoint = checkpoint.latest_checkpoint(out_dir) if resume else None
    if last_checkpoint is not None:
        state = checkpoint.load_checkpoint(last_checkpoint)
        if len(state["ranks"]) != world:
            raise ValueError(
                f"{last_checkpoint} was written by {len(state['ranks'])} ranks; this run has {world}"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        reference.load_state_dict(state["reference"])
        checkpoint.set_rng_state(state["ranks"][info.rank]["rng"])
        sampler.position = state["ranks"][info.rank]["data_position"]
        start_step = state["step"]
    elif resume and info.is_main:
        print(f"--resume: no checkpoint under {checkpoint.checkpoint_dir(out_dir)}; starting from step 0")

    # ---- rollout engine (its own copy of the weights; synced from the trainer, never via disk) -------
    if engine is None:
        engine = make_rollout_engine(
            assets.model_dir,
            backend=cfg.rollout.backend,
            dtype="bfloat16" if on_gpu else "float32",
            max_model_len=cfg.rollout.max_model_len,
            seed=cfg.train.seed + info.rank,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            model=model,  # the hf engine samples with the trainer's module itself; vLLM loads model_dir
        )
    if start_step > 0:
        engine.sync_weights(model)

    def save(step: int) -> Path | None:
        ranks = checkpoint.gather_rank_states(
            {"rng": checkpoint.rng_state(), "data_position": sampler.position}
        )
        path = None
        if info.is_main:
            path = checkpoint.save_checkpoint(
                out_dir,
                step,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "reference": reference.state_dict(),
                    "ranks": ranks,
                    "config": cfg.to_dict(),
                },
                keep=cfg.train.keep_checkpoints,
            )
        distributed.barrier(info)
        return path

    log = MetricsLog(out_dir, enabled=info.is_main, resume_step=start_step)
    bar = ProgressBar(cfg.train.steps, initial=start_step, enabled=info.is_main and cfg.train.progress)
    if info.is_main:
        bar.write(f"rpg_train: {world} rank(s) on {device}, loss {loss_config}, out {out_dir}")
    group_size = cfg.rollout.group_size
    groups_per_rank = cfg.train.prompts_per_step // world
    eval_seed = cfg.train.seed * 7_919 + 13
    if start_step == 0 and eval_prompts:
        log.log({"step": 0, "eval_accuracy": evaluate(engine, eval_prompts, reward_fn, cfg, info, eval_seed)})

    for step in range(start_step, cfg.train.steps):
        step_start = time.perf_counter()

        # 1. rollouts from the engine, scored by the verifier (dynamic sampling drops all-equal groups)
        engine.wake()
        rollout_seed = (cfg.train.seed * 1_000_003 + step * 1_009 + info.rank * 17) % 2**31
        rollouts, stats = collect_rollouts(engine, sampler, reward_fn, cfg, groups_per_rank, rollout_seed)
        engine.sleep()
        rollout_time = time.perf_counter() - step_start

        # 2. old (= sampling policy) log-probs from the trainer's model, and the reference's if separate
        batch = build_batch(rollouts.prompt_ids, rollouts.completion_ids, pad_id).to(device)
        rewards = rollouts.rewards.to(device)
        model.eval()
        old_logprobs, entropy = sequence_logprobs(
            model,
            batch,
            micro_batch=cfg.train.micro_batch_seqs,
            temperature=cfg.rollout.temperature,
            backend=backend,
            bf16=bf16,
        )
        ref_logprobs = None
        if not reference.is_old_policy:
            ref_logprobs, _ = sequence_logprobs(
                reference.model,
                batch,
                micro_batch=cfg.train.micro_batch_seqs,
                temperature=cfg.rollout.temperature,
                backend=backend,
                bf16=bf16,
            )
        model.train()

        # 3. advantages (rpg: reward minus its group's mean, no std division; reinforce_pp: token returns)
        if cfg.algo.advantage == "reinforce_pp":
            advantages = rk.compute_advantages(
                "reinforce_pp",
                rewards,
                group_size,
                mask=batch.mask,
                old_logprobs=old_logprobs,
                ref_logprobs=old_logprobs if ref_logprobs is None else ref_logprobs,
                beta_kl=cfg.algo.reward_kl_beta,
            )
        else:
            advantages = rk.compute_advantages(cfg.algo.advantage, rewards, group_size)

        # 4. optimizer steps over mini-batches, gradients accumulated over micro-batches
        try:
            update = update_policy(
                policy,
                model,
                optimizer,
                scheduler,
                reference,
                loss_config,
                cfg,
                info,
                batch,
                old_logprobs,
                ref_logprobs,
                advantages,
                backend=backend,
                bf16=bf16,
            )
        except TrainingDiverged as err:
            good = checkpoint.latest_checkpoint(out_dir)
            raise TrainingDiverged(
                f"step {step + 1}: {err} Last good checkpoint: {good or 'none written yet'}."
            ) from None

        # 5. push the new weights to the rollout engine (in memory)
        engine.wake()
        engine.sync_weights(model)
        engine.sleep()

        # 6. metrics (reduced over ranks), eval, checkpoint
        step_time = time.perf_counter() - step_start
        tokens = float(batch.mask.sum())
        sums = {
            "reward": float(rewards.sum()),
            "accuracy": float(is_correct(rewards).sum()),
            "response_length": tokens,
            "entropy": float((entropy * batch.mask).sum()),
            **update.sums,
            **stats,
        }
        counts = {
            "reward": len(rewards),
            "accuracy": len(rewards),
            "response_length": len(rewards),
            "entropy": tokens,
            **{k: update.tokens for k in update.sums},
            **{k: 1.0 for k in stats},
        }
        record = {"step": step + 1, **distributed.reduce_metrics(sums, counts, info)}
        record["loss"], record["grad_norm"] = update.loss, update.grad_norm
        record["lr"] = scheduler.get_last_lr()[0]
        record["tokens_per_s"] = distributed.all_reduce_sum(tokens, info) / step_time
        record["rollout_s"], record["step_s"] = rollout_time, step_time
        if reference.updates:
            record["ref_updates"] = reference.updates
        if eval_prompts and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.steps):
            record["eval_accuracy"] = evaluate(engine, eval_prompts, reward_fn, cfg, info, eval_seed)
        log.log(record)
        bar.update(record)
        if (
            cfg.train.checkpoint_every
            and (step + 1) % cfg.train.checkpoint_every == 0
            or step + 1 == cfg.train.steps
        ):
            save(step + 1)

    # ---- summary ---------------------------------------------------------------------------------------
    bar.close()
    summary: dict[str, Any] = {}
    if info.is_main:
        records = read_metrics(out_dir / "metrics.jsonl")
        summary = summarize(records)
        plot = plot_metrics(
            records, out_dir / "metrics.png", title=f"{cfg.algo.loss} ({loss_config.kl or ''})"
        )
        summary["plot"] = str(plot) if plot else None
        summary["checkpoint"] = str(checkpoint.latest_checkpoint(out_dir))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            "rpg_train summary: "
            + ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
                for k, v in summary.items()
            )
        )
    if not isinstance(engine, VLLMEngine):  # vLLM tears the process groups down itself at exit
        distributed.teardown()
    return summary
