"""Process-group set-up for ``torchrun`` (gloo on CPU, NCCL on GPU) and metric reduction across ranks.

One process per rank; without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything here is a
no-op with ``rank = 0``, ``world_size = 1``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_OWN_GROUP = False  # whether setup() initialised the default process group


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto", *, group_for_one_rank: bool = False) -> DistInfo:
    """Initialise the process group if launched by ``torchrun``; pick this rank's device.

    ``group_for_one_rank``: also give a single process a (one-rank) group, for what needs one (FSDP).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    global _OWN_GROUP
    if (world_size > 1 or group_for_one_rank) and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if world_size > 1:
            dist.init_process_group(backend=backend)
        else:  # no torchrun rendezvous: an in-process store
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown() -> None:
    """Destroy the process group if :func:`setup` created it (an in-process vLLM may hold its own)."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


def all_reduce_sum(value: float | torch.Tensor, info: DistInfo) -> float:
    """Sum of a scalar over ranks (a float on every rank)."""
    tensor = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1).clone()
    if info.enabled:
        # NCCL needs device tensors; gloo takes CPU ones
        tensor = tensor.to(info.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


def all_reduce_sums(values: list[float], info: DistInfo) -> list[float]:
    """Element-wise sums of ``values`` over ranks, in one collective call."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if info.enabled:
        tensor = tensor.to(info.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def reduce_metrics(sums: dict[str, float], counts: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Global means ``sum_r sums[k] / sum_r counts[k]`` for every key, in one collective call.

    Every rank must pass the same keys. Keys with a zero global count are left out.
    """
    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys] + [counts[k] for k in keys], dtype=torch.float64)
    if info.enabled:
        packed = packed.to(info.device)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    packed = packed.cpu()
    n = len(keys)
    return {k: float(packed[i] / packed[n + i]) for i, k in enumerate(keys) if packed[n + i] > 0}


def reduce_max(value: float, info: DistInfo) -> float:
    tensor = torch.tensor([value], dtype=torch.float64)
    if info.enabled:
        tensor = tensor.to(info.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (e.g. a non-finite loss somewhere)."""
    return reduce_max(1.0 if flag else 0.0, info) > 0


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` is ignored on the other ranks)."""
    if not info.enabled:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
