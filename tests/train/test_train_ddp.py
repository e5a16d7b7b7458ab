"""DDP (gloo, 2 CPU processes) takes the same optimizer steps as one process on the union of the batches.

Fixed rollouts (no engine): each rank holds 4 prompt groups; an optimizer step takes 2 groups per rank, so the
single process sees, per step, rank 0's two groups followed by rank 1's. Micro-batches of 3 sequences do not
divide the groups evenly, so gradient accumulation and the global normaliser are exercised too.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import rpg_kernels as rk
from rpg_train import distributed
from rpg_train.config import build_config
from rpg_train.logprobs import build_batch, sequence_logprobs
from rpg_train.reference import ReferencePolicy
from rpg_train.train import update_policy
from tests.support import tiny_causal_lm

GROUP_SIZE, GROUPS_PER_RANK, VOCAB = 2, 4, 97


def tiny_model():
    return tiny_causal_lm("qwen2", vocab_size=VOCAB)


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


def run_update(prompts, completions, rewards, info, agg):
    """One rollout step's update (2 optimizer steps) from fixed rollouts; returns (model, stats)."""
    cfg = build_config(
        "tiny",
        overrides=[
            f"rollout.group_size={GROUP_SIZE}",
            "train.prompts_per_step=8",
            "train.mini_batch_prompts=4",
            "train.micro_batch_seqs=3",
            "optim.lr=0.5",
            "optim.grad_clip=1e6",
            "rollout.max_tokens=8",
            f"algo.loss_overrides={{agg: {agg}, beta: 0.05}}",
        ],
    )
    loss_config = rk.LossConfig.preset(cfg.algo.loss, **cfg.algo.loss_overrides)
    model = tiny_model()
    batch = build_batch(prompts, completions, pad_id=0)
    old, _ = sequence_logprobs(model, batch, micro_batch=4, backend="torch")
    # move the old log-probs away from the current ones (ratios != 1, clipping active); the shift depends
    # only on the token and its place in the completion, so both layouts get the same one
    place = batch.mask.cumsum(1)
    old = (old + 0.3 * torch.sin(1.37 * batch.targets.clamp(min=0).float() + place)) * batch.mask
    advantages = rk.compute_advantages("rpg", rewards, GROUP_SIZE)
    # plain SGD: unlike Adam it is not invariant to the gradient's scale, so a wrong normaliser shows
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    policy = torch.nn.parallel.DistributedDataParallel(model) if info.enabled else model
    stats = update_policy(
        policy,
        model,
        optimizer,
        scheduler,
        ReferencePolicy(model),
        loss_config,
        cfg,
        info,
        batch,
        old,
        None,
        advantages,
        backend="torch",
    )
    return model, stats


AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    results = {}
    for agg in AGGS:
        model, stats = run_update(*rank_rollouts(rank), info, agg)
        results[agg] = {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "loss": stats.loss,
        }
    torch.save(results, f"{out_path}.rank{rank}")
    distributed.teardown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
def test_ddp_two_ranks_equal_one_process_on_union(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(_free_port(), out_path), nprocs=2, join=True)
    ranks = [torch.load(f"{out_path}.rank{rank}") for rank in range(2)]
    initial = tiny_model().state_dict()
    single = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for agg in AGGS:
        model, stats = run_update(*union_rollouts(), single, agg)
        for name, value in model.state_dict().items():
            update = value - initial[name]
            for rank in range(2):  # the two ranks' updates equal the single process's (and each other's)
                torch.testing.assert_close(
                    ranks[rank][agg]["params"][name] - initial[name],
                    update,
                    rtol=1e-4,
                    atol=1e-7,
                    msg=f"{agg}: {name}",
                )
        assert stats.loss == pytest.approx(ranks[0][agg]["loss"], rel=1e-5, abs=1e-7), agg
        moved = [bool((value - initial[k]).abs().max() > 1e-6) for k, value in model.state_dict().items()]
        assert sum(moved) > len(moved) // 2, f"{agg}: the update left most parameters unchanged"
