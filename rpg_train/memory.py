"""Memory per rank: the bytes of parameters, gradients and optimizer states a rank measurably holds."""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.tensor import DTensor


def _storages(tensors) -> dict[int, int]:
    """``{data_ptr: bytes}`` of the distinct storages behind ``tensors`` (a DTensor's local shard)."""
    out = {}
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if isinstance(tensor, Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """Measured bytes this rank holds for the ``parameters``, their ``gradients`` and the ``optimizer``'s
    states (distinct storages, so tied parameters count once and FSDP shards count as what they are)."""
    params = list(model.parameters())
    states = [value for state in optimizer.state.values() for value in state.values()]
    return {
        "parameters": sum(_storages(params).values()),
        "gradients": sum(_storages(p.grad for p in params if p.grad is not None).values()),
        "optimizer": sum(_storages(states).values()),
    }
