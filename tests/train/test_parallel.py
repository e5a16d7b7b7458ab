"""DDP and FSDP2 (gloo, 2 CPU processes) take the same optimizer steps as one process on the union of the
batches, tied and untied heads, with and without gradient checkpointing; FSDP holds ~1/world of the states.

Fixed rollouts (no engine): each rank holds 4 prompt groups; an optimizer step takes 2 groups per rank, so the
single process sees, per step, rank 0's two groups followed by rank 1's. Micro-batches of 3 sequences do not
divide the groups evenly, so gradient accumulation and the global normaliser are exercised too. Two updates of
two optimizer steps each; plain SGD (unlike Adam it is not invariant to the gradient's scale, so a wrong
normaliser shows).
"""

import os
import socket
from typing import NamedTuple

import pytest
import torch
import torch.multiprocessing as mp

import rpg_kernels as rk
from rpg_train import distributed, parallel
from rpg_train.config import build_config
from rpg_train.logprobs import PolicyLoss, build_batch, sequence_logprobs
from rpg_train.memory import state_bytes
from rpg_train.reference import ReferencePolicy
from rpg_train.train import Policy, update_policy
from tests.support import tiny_causal_lm

GROUP_SIZE, GROUPS_PER_RANK, VOCAB, UPDATES = 2, 4, 97, 2
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# (agg, tied head, gradient checkpointing): every aggregation untied, then the other head/checkpointing cases


class Case(NamedTuple):
    agg: str
    tied: bool = False
    checkpointing: bool = False
    clip: float = 1e6  # optim.grad_clip: 1e6 never clips
    offload: bool = False  # fsdp only
    tokens: int = 0  # train.micro_batch_tokens (0: micro-batches of 3 sequences)
    packing: str = "never"

    def __str__(self) -> str:
        return (
            f"{self.agg}-{'tied' if self.tied else 'untied'}{'-checkpointing' if self.checkpointing else ''}"
            f"{f'-clip{self.clip:g}' if self.clip < 1e6 else ''}{'-offload' if self.offload else ''}"
            f"{f'-tokens{self.tokens}' if self.tokens else ''}{'-packed' if self.packing == 'always' else ''}"
        )


CASES = [Case(agg) for agg in AGGS] + [
    Case("token-mean", tied=True),
    Case("token-mean", tied=True, checkpointing=True),
    Case("token-mean", checkpointing=True),
    Case("token-mean", tied=True, clip=0.05),  # clipping by the global norm of the sharded gradients
    Case("token-mean", clip=0.05, offload=True),
    # token budgets: the ranks' rows split into different numbers of micro-batches, evened out
    Case("seq-mean-token-mean", tokens=24),
    Case("seq-mean-token-sum-norm", checkpointing=True, tokens=20, packing="always"),
]
SINGLE = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def rank_rollouts(rank: int):
    """Rank ``rank``'s fixed rollouts: prompts/completions of varied lengths and rewards in [0, 1]."""
    gen = torch.Generator().manual_seed(100 + rank)
    prompts, completions = [], []
    for _ in range(GROUPS_PER_RANK):
        prompt = torch.randint(
            1, VOCAB, (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(GROUP_SIZE):
            length = int(torch.randint(1, 9, (1,), generator=gen))
            prompts.append(prompt)
            completions.append(torch.randint(1, VOCAB, (length,), generator=gen).tolist())
    return prompts, completions, torch.rand(len(prompts), generator=gen)


def union_rollouts():
    """Both ranks' rollouts in the single-process order: per optimizer step, rank 0's rows then rank 1's."""
    parts = [rank_rollouts(rank) for rank in range(2)]
    rows_per_step = 2 * GROUP_SIZE
    prompts, completions, rewards = [], [], []
    for step in range(GROUPS_PER_RANK // 2):
        for rank in range(2):
            rows = slice(step * rows_per_step, (step + 1) * rows_per_step)
            prompts += parts[rank][0][rows]
            completions += parts[rank][1][rows]
            rewards.append(parts[rank][2][rows])
    return prompts, completions, torch.cat(rewards)


def make_policy(mode, info, tied, checkpointing, optimizer="sgd", offload=False, **sizes):
    model = tiny_causal_lm("qwen2", tie_word_embeddings=tied, **{"vocab_size": VOCAB, **sizes})
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss = PolicyLoss(model, rk.LossConfig.preset("rpg_reinforce"), backend="torch")
    module = parallel.parallelize(loss, mode, info, offload=offload)
    loss.train()
    if optimizer == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=0.5)
    else:
        optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    return Policy(model, loss, module, optim, scheduler, ReferencePolicy(model))


def token_plan(prompts, completions, rows_per_step, case: Case):
    """One rank's own micro-batches under ``case``'s token budget (before the ranks even their counts)."""
    from rpg_train.batching import plan_micro_batches

    batch = build_batch(prompts, completions, pad_id=0)
    lengths = batch.attention_mask.sum(1)
    return plan_micro_batches(
        lengths,
        rows_per_step,
        micro_batch_seqs=3,
        micro_batch_tokens=case.tokens,
        packed=case.packing == "always",
    )


def run_updates(mode, info, prompts, completions, rewards, case: Case):
    """``UPDATES`` updates (2 optimizer steps each) from fixed rollouts: full weights, losses and gradient
    norms, calls of the first layer in the last update."""
    cfg = build_config(
        "tiny",
        overrides=[
            f"rollout.group_size={GROUP_SIZE}",
            "train.prompts_per_step=8",
            "train.mini_batch_prompts=4",
            "train.micro_batch_seqs=3",
            f"optim.grad_clip={case.clip}",
            "rollout.max_tokens=8",
            "rollout.max_model_len=16",
            f"train.micro_batch_tokens={case.tokens}",
            f"train.packing={case.packing}",
        ],
    )
    policy = make_policy(mode, info, case.tied, case.checkpointing, offload=case.offload)
    policy.loss.loss_config = rk.LossConfig.preset("rpg_reinforce", agg=case.agg, beta=0.05)
    calls = []
    parallel.decoder_layers(policy.model)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    batch = build_batch(prompts, completions, pad_id=0)
    advantages = rk.compute_advantages("rpg", rewards, GROUP_SIZE)
    losses = []
    for _ in range(UPDATES):
        old, _ = sequence_logprobs(policy.loss, batch, micro_batch=4)
        # move the old log-probs away from the current ones (ratios != 1, clipping active); the shift depends
        # only on the token and its place in the completion, so both layouts get the same one
        place = batch.mask.cumsum(1)
        old = (old + 0.3 * torch.sin(1.37 * batch.targets.clamp(min=0).float() + place)) * batch.mask
        calls.clear()
        stats = update_policy(policy, cfg, info, batch, old, None, advantages)
        losses += [stats.loss, stats.grad_norm]
    weights = {name: tensor.clone() for name, tensor in parallel.full_weights(policy.model)}
    return weights, losses, len(calls)


def measure_states(mode, info, rank) -> dict[str, int]:
    """The bytes of parameters, gradients and AdamW states one rank holds right after an optimizer step
    (before the gradients are freed), for a model whose LM head is most of it."""
    policy = make_policy(mode, info, False, False, "adamw", vocab_size=512, hidden_size=64)
    measured = {}
    policy.optimizer.register_step_post_hook(
        lambda *_: measured.update(state_bytes(policy.model, policy.optimizer))
    )
    cfg = build_config("tiny", overrides=["rollout.group_size=2", "train.mini_batch_prompts=4"])
    prompts, completions, rewards = rank_rollouts(rank)
    batch = build_batch(prompts, completions, pad_id=0)
    old, _ = sequence_logprobs(policy.loss, batch, micro_batch=8)
    update_policy(policy, cfg, info, batch, old, None, rk.compute_advantages("rpg", rewards, GROUP_SIZE))
    return measured


def reference_gaps(mode, info, rank) -> list[float]:
    """A frozen reference refreshed every 2 optimizer steps (copied before the policy is sharded, sharded
    alike): the largest gap between its and the policy's log-probs after each of the 2 optimizer steps of an
    update (before the refresh rule runs), then after the update (refreshed)."""
    model = tiny_causal_lm("qwen2", vocab_size=VOCAB)
    loss = PolicyLoss(model, rk.LossConfig.preset("rpg_reinforce", beta=0.05), backend="torch")
    frozen = lambda copy: parallel.parallelize(PolicyLoss(copy, backend="torch"), mode, info, trainable=False)  # noqa: E731
    reference = ReferencePolicy(model, "every_k", every_k=2, wrap=frozen)
    module = parallel.parallelize(loss, mode, info)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy = Policy(model, loss, module, optimizer, scheduler, reference)
    cfg = build_config("tiny", overrides=["rollout.group_size=2", "train.mini_batch_prompts=4"])
    prompts, completions, rewards = rank_rollouts(rank)
    batch = build_batch(prompts, completions, pad_id=0)

    def gap() -> float:
        ours, _ = sequence_logprobs(policy.loss, batch, micro_batch=8)
        theirs, _ = sequence_logprobs(reference.model, batch, micro_batch=8)
        return float((ours - theirs).abs().max())

    gaps = []
    optimizer.register_step_post_hook(lambda *_: gaps.append(gap()))
    old, _ = sequence_logprobs(policy.loss, batch, micro_batch=8)
    ref, _ = sequence_logprobs(reference.model, batch, micro_batch=8)
    update_policy(policy, cfg, info, batch, old, ref, rk.compute_advantages("rpg", rewards, GROUP_SIZE))
    return [*gaps, gap()]


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    results = {}
    for mode in ("ddp", "fsdp"):
        for case in CASES:
            if mode == "fsdp" or not case.offload:
                results[mode, str(case)] = run_updates(mode, info, *rank_rollouts(rank), case)
        results[mode, "states"] = measure_states(mode, info, rank)
        results[mode, "reference"] = reference_gaps(mode, info, rank)
    torch.save(results, f"{out_path}.rank{rank}")
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out_path = str(tmp_path_factory.mktemp("parallel") / "results.pt")
    mp.spawn(_worker, args=(_free_port(), out_path), nprocs=2, join=True)
    return [torch.load(f"{out_path}.rank{rank}") for rank in range(2)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_fsdp_equals_ddp_equals_one_process_on_union(two_ranks, case):
    initial = tiny_causal_lm("qwen2", vocab_size=VOCAB, tie_word_embeddings=case.tied).state_dict()
    weights, losses, calls = run_updates("ddp", SINGLE, *union_rollouts(), case._replace(offload=False))
    for mode in ("fsdp",) if case.offload else ("ddp", "fsdp"):
        for rank in range(2):
            got, got_losses, got_calls = two_ranks[rank][mode, str(case)]
            assert got.keys() == weights.keys()
            for name, value in weights.items():
                torch.testing.assert_close(
                    got[name], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {case} {name}"
                )
            assert got_losses == pytest.approx(losses, rel=1e-5, abs=1e-7), (mode, case)  # losses, norms
            if case.tokens:  # every rank runs as many micro-batches as the rank with the most
                assert got_calls == two_ranks[1 - rank][mode, str(case)][2], (mode, case)
                continue
            # per update, 2 mini-batches of 4 rows per rank = 4 micro-batches of <= 3 rows; checkpointing
            # recomputes each layer's forward in backward, so it calls the layer twice as often
            assert got_calls == (8 if case.checkpointing else 4), (mode, case, got_calls)
    if case.tokens:  # the two ranks' own plans differ in length: the counts were evened out
        counts = [
            [len(m) for m in token_plan(*rank_rollouts(rank)[:2], 2 * GROUP_SIZE, case).micro_batches]
            for rank in range(2)
        ]
        assert counts[0] != counts[1], counts
    else:
        assert calls == (12 if case.checkpointing else 6), calls  # one process: 2 x 8 rows = 6 micro-batches
    moved = [bool((value - initial[k]).abs().max() > 1e-6) for k, value in weights.items()]
    assert sum(moved) > len(moved) // 2, f"{case}: the updates left most parameters unchanged"
    norms = losses[1::2]
    assert (max(norms) > case.clip) == (case.clip < 1e6), norms  # the clipping cases clip


@pytest.mark.timeout(300)
def test_fsdp_holds_half_the_states_of_ddp_on_two_ranks(two_ranks):
    for rank in range(2):
        ddp, fsdp = two_ranks[rank]["ddp", "states"], two_ranks[rank]["fsdp", "states"]
        print(f"rank {rank}: ddp {ddp}, fsdp {fsdp}, fsdp/ddp {sum(fsdp.values()) / sum(ddp.values()):.3f}")
        for kind in ("parameters", "gradients", "optimizer"):
            assert ddp[kind] > 0 and 0.45 < fsdp[kind] / ddp[kind] < 0.6, (rank, kind, ddp, fsdp)


@pytest.mark.timeout(300)
def test_frozen_reference_is_sharded_like_the_policy_and_refreshed(two_ranks):
    for mode in ("ddp", "fsdp"):
        for rank in range(2):
            after_step_1, after_step_2, refreshed = two_ranks[rank][mode, "reference"]
            assert after_step_2 > after_step_1 > 1e-3, (mode, rank)  # frozen while the policy moves
            assert refreshed == 0.0, (mode, rank)  # then a copy of the policy, shard by shard
