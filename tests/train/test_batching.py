"""`rpg_train.batching`: token-budget micro-batches and packing leave the loss and the gradients unchanged.

The plans: every row once, within the budget, the fewest micro-batches and then the least padding (against a
brute force over every set partition), the same count on every rank. The trainer: ``update_policy`` in float64
with fixed micro-batches, token budgets and packed micro-batches gives the same loss and gradients (to float64
rounding: the parts are summed in another order), for every aggregation. Packing: the bookkeeping (targets,
positions, the rows the hidden states are gathered from) checked exactly, and the log-probs of packed rows
equal per-sequence forward passes with every CPU attention that reads packed ``position_ids``.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import rpg_kernels as rk
from rpg_train import batching
from rpg_train.config import build_config
from rpg_train.distributed import DistInfo
from rpg_train.logprobs import IGNORE_INDEX, PolicyLoss, build_batch, sequence_logprobs
from rpg_train.reference import ReferencePolicy
from rpg_train.train import Policy, micro_batch_plan, update_policy
from tests.support import tiny_causal_lm
from tests.train.runs import tiny_config

VOCAB = 61
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def set_partitions(items: list[int]):
    """Every partition of ``items`` into non-empty groups."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [[first], *partition]
        for i in range(len(partition)):
            yield [*partition[:i], [first, *partition[i]], *partition[i + 1 :]]


@pytest.mark.parametrize("seed", range(6))
def test_padded_split_is_the_fewest_micro_batches_then_the_least_padding(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(7)]
    budget, min_width = rng.randint(12, 30), rng.randint(1, 3)
    groups = batching.split_by_tokens(lengths, budget, packed=False, min_width=min_width)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in groups)

    def cost(group):
        return batching.micro_batch_cost([lengths[i] for i in group], False, min_width)

    assert all(cost(g) <= budget for g in groups)
    feasible = [p for p in set_partitions(list(range(len(lengths)))) if all(cost(g) <= budget for g in p)]
    best = min((len(p), sum(cost(g) for g in p)) for p in feasible)
    assert (len(groups), sum(cost(g) for g in groups)) == best


def test_packed_split_fits_the_budget_and_long_rows_get_their_own():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(50)] + [70]
    groups = batching.split_by_tokens(lengths, 64, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [50] in groups  # longer than the budget: alone
    assert all(sum(lengths[i] for i in g) <= 64 for g in groups if g != [50])
    assert len(groups) <= sum(lengths) // 64 + 3  # first fit decreasing is close to the bound
    with pytest.raises(ValueError, match="budget"):
        batching.split_by_tokens(lengths, 0, packed=True)


def spread_lengths(seed: int, groups: int, group_size: int, cap: int) -> torch.Tensor:
    """Prompt lengths in [32, 512] per group, completion lengths uniform in [1, cap]."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(32, 513, (groups,), generator=gen).repeat_interleave(group_size)
    return prompts + torch.randint(1, cap + 1, (groups * group_size,), generator=gen)


def test_token_budget_pads_far_less_than_fixed_micro_batches():
    """The rpg preset's mini-batch per rank on 8 GPUs (4 prompts x 16), completions spread over [1, 4096]."""
    lengths = spread_lengths(0, 4, 16, 4096)
    fixed = batching.plan_micro_batches(lengths, 64, micro_batch_seqs=4)
    budget = batching.plan_micro_batches(lengths, 64, micro_batch_seqs=4, micro_batch_tokens=18432)
    packed = batching.plan_micro_batches(
        lengths, 64, micro_batch_seqs=4, micro_batch_tokens=18432, packed=True
    )
    print(f"padding: fixed {fixed.padding_fraction:.3f}, token budget {budget.padding_fraction:.3f}")
    assert fixed.padding_fraction > 0.2 and budget.padding_fraction < 0.1 and packed.padding_fraction == 0
    assert len(budget.flat()) < len(fixed.flat())
    assert all(budget.cost(rows) <= 18432 for rows in budget.flat())
    assert all(packed.cost(rows) <= 18432 for rows in packed.flat())


def test_splitting_to_another_ranks_count_keeps_every_row_once(monkeypatch):
    lengths = spread_lengths(1, 2, 8, 300)
    local = batching.plan_micro_batches(lengths, 8, micro_batch_seqs=2, micro_batch_tokens=4000)
    counts = [len(m) for m in local.micro_batches]
    monkeypatch.setattr(batching.distributed, "reduce_max", lambda value, info: value + 3)
    two = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    plan = batching.plan_micro_batches(lengths, 8, micro_batch_seqs=2, micro_batch_tokens=4000, info=two)
    assert [len(m) for m in plan.micro_batches] == [c + 3 for c in counts]
    for rows, micros in zip(plan.mini_batches, plan.micro_batches):
        assert torch.cat(micros).sort().values.tolist() == list(range(rows.start, rows.stop))
        assert all(plan.cost(m) <= 4000 for m in micros)


def test_packing_follows_the_attention(monkeypatch):
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB)
    assert not batching.packing_enabled("auto", model)  # eager: a dense block-diagonal mask
    assert batching.packing_enabled("always", model) and not batching.packing_enabled("never", model)
    for name in ("flash_attention_2", "flex_attention", "kernels-community/flash-attn2"):
        monkeypatch.setattr(model.config, "_attn_implementation", name)
        assert batching.packing_enabled("auto", model), name
    with pytest.raises(ValueError, match="train.packing"):
        batching.packing_enabled("yes", model)


def rollouts(seed: int, groups: int = 6, group_size: int = 2):
    gen = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(groups):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        for _ in range(group_size):
            length = int(torch.randint(0, 10, (1,), generator=gen))  # empty completions too
            prompts.append(prompt.tolist())
            completions.append(torch.randint(1, VOCAB, (length,), generator=gen).tolist())
    return prompts, completions, torch.rand(len(prompts), generator=gen)


def test_pack_bookkeeping_is_exact():
    prompts, completions, _ = rollouts(3)
    batch = build_batch(prompts, completions, pad_id=0)
    rows = torch.tensor([7, 0, 4, 11, 5])
    micro = batch.select(rows)
    packed = micro.pack()
    lengths = [len(prompts[i]) + len(completions[i]) for i in rows.tolist()]
    tokens = [t for i in rows.tolist() for t in prompts[i] + completions[i]]
    assert packed.input_ids.tolist() == [tokens]
    assert packed.position_ids.tolist() == [[p for n in lengths for p in range(n)]]
    assert torch.equal(packed.targets, micro.targets) and torch.equal(packed.mask, micro.mask)
    starts = [sum(lengths[:j]) for j in range(len(lengths))]
    for j, i in enumerate(rows.tolist()):
        scored = packed.rows[j][micro.mask[j] > 0].tolist()
        # the completion's tokens, each predicted by the position just before it in the same sequence
        first = starts[j] + len(prompts[i]) - 1
        assert scored == list(range(first, first + len(completions[i])))
        assert [tokens[r + 1] for r in scored] == completions[i]
    assert (packed.rows[micro.mask == 0] == 0).all() and (
        packed.targets[micro.mask == 0] == IGNORE_INDEX
    ).all()


@pytest.mark.parametrize(
    "attention", ["eager", "sdpa", pytest.param("flex_attention", marks=pytest.mark.slow)]
)
def test_packed_logprobs_equal_per_sequence_forward_passes(attention):
    """Every CPU attention of transformers 5.19 reads packed position_ids (eager and sdpa through a
    block-diagonal mask, flex_attention through its block mask, compiled on first use)."""
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=4)
    model.config._attn_implementation = attention
    prompts, completions, _ = rollouts(5)
    batch = build_batch(prompts, completions, pad_id=0)
    lengths = batch.attention_mask.sum(1)
    plan = batching.plan_micro_batches(lengths, 6, micro_batch_seqs=3, micro_batch_tokens=30, packed=True)
    policy = PolicyLoss(model, backend="torch")
    packed, packed_entropy = sequence_logprobs(policy, batch, plan=plan)
    padded, padded_entropy = sequence_logprobs(policy, batch, micro_batch=5)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_entropy, padded_entropy, rtol=1e-5, atol=1e-5)
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if not completion:
            assert (packed[i] == 0).all()
            continue
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor([prompt + completion])).logits[0].double(), -1)
        expected = full[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(packed[i][batch.mask[i] > 0].double(), expected, rtol=1e-4, atol=1e-5)


def float64_policy(agg: str) -> Policy:
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB, seed=2).double()
    model.config._attn_implementation = "sdpa"  # eager's softmax runs in float32 whatever the dtype
    config = rk.LossConfig.preset("rpg_reinforce", agg=agg, beta=0.05)
    if agg == "seq-mean-token-sum-norm":
        config = rk.LossConfig.preset("rpg_reinforce", agg=agg, beta=0.05, max_completion_length=9)
    loss = PolicyLoss(model, config, backend="torch")
    loss.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return Policy(model, loss, loss, optimizer, scheduler, ReferencePolicy(model))


def updated(agg: str, overrides: list[str]) -> tuple[float, list[dict[str, torch.Tensor]], int]:
    """The loss and every optimizer step's gradients of one update from fixed rollouts, and the number of
    micro-batches it ran."""
    cfg = build_config(
        "tiny",
        overrides=[
            "rollout.group_size=2",
            "train.prompts_per_step=6",
            "train.mini_batch_prompts=3",
            "train.micro_batch_seqs=4",
            "rollout.max_tokens=9",
            "rollout.max_model_len=16",
            *overrides,
        ],
    )
    policy = float64_policy(agg)
    prompts, completions, rewards = rollouts(9)
    batch = build_batch(prompts, completions, pad_id=0)
    plan = micro_batch_plan(cfg, SINGLE, policy, batch)
    old, _ = sequence_logprobs(policy.loss, batch, micro_batch=4)  # float32: the same for every plan
    old = (old.double() + 0.3 * torch.sin(1.7 * batch.targets.clamp(min=0).double())) * batch.mask
    grads: list[dict[str, torch.Tensor]] = []
    policy.optimizer.register_step_pre_hook(
        lambda *_: grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters()})
    )
    advantages = rk.compute_advantages("rpg", rewards.double(), 2)
    stats = update_policy(policy, cfg, SINGLE, batch, old, old - 0.05 * batch.mask, advantages, plan)
    assert stats.real_tokens == int(batch.attention_mask.sum())
    return stats.loss, grads, len(plan.flat())


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_token_budget_and_packed_updates_equal_fixed_micro_batches(agg):
    loss, grads, fixed_count = updated(agg, [])
    for overrides in (
        ["train.micro_batch_tokens=24"],
        ["train.micro_batch_tokens=24", "train.packing=always"],
    ):
        other_loss, other_grads, count = updated(agg, overrides)
        assert count != fixed_count  # another split of the same rows
        assert other_loss == pytest.approx(loss, rel=1e-12, abs=1e-15), overrides
        assert len(other_grads) == len(grads) == 2
        for step, (ours, theirs) in enumerate(zip(other_grads, grads)):
            for name, value in theirs.items():
                torch.testing.assert_close(
                    ours[name], value, rtol=1e-11, atol=1e-14, msg=f"{overrides} step {step} {name}"
                )
        assert any(g.abs().max() > 1e-4 for g in grads[0].values())


def test_config_checks_the_token_budget_and_the_presets_use_one():
    with pytest.raises(ValueError, match="rollout.max_model_len"):
        build_config("tiny", overrides=["train.micro_batch_tokens=32"])  # tiny: max_model_len 64
    with pytest.raises(ValueError, match="micro_batch_tokens must be >= 0"):
        build_config("tiny", overrides=["train.micro_batch_tokens=-1"])
    with pytest.raises(ValueError, match="train.packing"):
        build_config("tiny", overrides=["train.packing=on"])
    assert build_config("tiny").train.micro_batch_tokens == 0  # CPU demo: fixed micro-batches
    paths = ["model.path=/m", "data.train_file=/d"]
    for preset in ("rpg", "rpg_8k", "grpo", "dapo", "reinforce_pp", "rpg_fkl"):
        cfg = build_config(preset, overrides=paths)
        assert cfg.train.micro_batch_tokens >= 4 * cfg.rollout.max_tokens, preset
        assert cfg.train.micro_batch_tokens >= cfg.rollout.max_model_len, preset


def test_plans_are_deterministic_and_fixed_plans_are_consecutive():
    lengths = spread_lengths(2, 3, 4, 50)
    fixed = batching.plan_micro_batches(lengths, 8, micro_batch_seqs=3)
    assert [m.tolist() for m in fixed.flat()] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9, 10], [11]]
    first = batching.plan_micro_batches(lengths, 8, micro_batch_seqs=3, micro_batch_tokens=800)
    again = batching.plan_micro_batches(lengths.clone(), 8, micro_batch_seqs=3, micro_batch_tokens=800)
    assert [m.tolist() for m in first.flat()] == [m.tolist() for m in again.flat()]
    assert list(itertools.chain(*[m.tolist() for m in first.micro_batches[0]])) != list(range(8))


@pytest.mark.timeout(600)
def test_a_run_with_token_budgets_and_packing_logs_padding_and_tokens_per_second(tmp_path):
    """train() end to end (the tiny task, the transformers engine): the plan reaches the log-prob passes
    and the update, and every step logs its padding fraction (0: packed) and training tokens/s."""
    from rpg_train.metrics import read_metrics
    from rpg_train.train import train

    for packing, out in (("never", "padded"), ("always", "packed")):
        train(tiny_config(tmp_path / out, "train.micro_batch_tokens=64", f"train.packing={packing}"))
        records = [r for r in read_metrics(tmp_path / out / "metrics.jsonl") if "reward" in r]
        assert len(records) == 2
        for record in records:
            assert record["train_tokens_per_s"] > 0
            assert (
                (record["padding_frac"] == 0.0)
                if packing == "always"
                else (0.0 <= record["padding_frac"] < 1.0)
            )
