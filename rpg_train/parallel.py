"""Data parallelism of the policy (``train.parallel``): DDP, or FSDP2 with every state sharded over the ranks.

- ``ddp``: every rank holds the full fp32 weights, their gradients and AdamW's two moments (16 bytes per
  parameter); gradients are all-reduced once per optimizer step (``no_sync`` on the other micro-batches).
- ``fsdp``: PyTorch's FSDP2 (``fully_shard``) on every decoder layer, then on the `PolicyLoss` root, so each
  rank keeps 1/world of those states. A layer's parameters are all-gathered just before its forward (and
  again for its backward) and its gradients are reduce-scattered right after its backward, on every
  micro-batch (accumulating unsharded gradients would cost the memory FSDP saves). The root's own group is
  the embedding, the final norm and the LM head (one parameter when tied): the root's pre-forward hook
  gathers it, so the fused loss reads the full head weight inside ``PolicyLoss.forward`` and the model is
  never gathered whole. On CUDA with ``bf16``: bf16 compute, fp32 master weights and fp32 gradient
  reduction (``MixedPrecisionPolicy``); on CPU fp32 (gloo). ``offload`` keeps the sharded parameters,
  gradients and optimizer states in CPU memory (``CPUOffloadPolicy``).

Also here: gradient clipping over sharded gradients (`clip_grad_norm_`) and the full weights one parameter at
a time (`full_weights`), which the rollout engines load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from rpg_train.config import PARALLEL_MODES

if TYPE_CHECKING:
    from rpg_train.distributed import DistInfo
    from rpg_train.logprobs import PolicyLoss


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (the classes its ``_no_split_modules`` names)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # by the classes a module is an instance of (fully_shard makes each layer an FSDP subclass of its own)
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(
            f"model: found no decoder layers to shard in {type(model).__name__} "
            f"(its _no_split_modules is {sorted(names)})"
        )
    return layers


def parallelize(
    policy: PolicyLoss,
    mode: str,
    info: DistInfo,
    *,
    bf16: bool = False,
    offload: bool = False,
    trainable: bool = True,
) -> nn.Module:
    """The module to call forward on: ``policy`` sharded in place (fsdp), ``DDP(policy)`` (ddp, several
    ranks) or ``policy`` itself (ddp, one rank).

    ``trainable=False`` is for a frozen copy (the reference policy): sharded like the trained one under
    fsdp but resharded after each forward (there is no backward to do it), never wrapped in DDP.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}; got {mode!r}")
    if offload and mode != "fsdp":
        raise ValueError("train.fsdp_offload needs train.parallel=fsdp")
    if mode == "ddp":
        return DistributedDataParallel(policy) if info.enabled and trainable else policy
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    on_cuda = info.device.type == "cuda"
    options = dict(
        mesh=mesh,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16 and on_cuda
        else MixedPrecisionPolicy(),
        offload_policy=CPUOffloadPolicy(pin_memory=on_cuda) if offload else OffloadPolicy(),
    )
    for layer in decoder_layers(policy.model):
        fully_shard(layer, **options)
    # the root keeps its group gathered from forward to backward (None), a frozen root frees it at once
    fully_shard(policy, reshard_after_forward=None if trainable else True, **options)
    register_fsdp_forward_method(policy, "logprobs")
    return policy


def grad_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """The context of one micro-batch's forward/backward: without DDP's all-reduce unless ``sync`` (the
    mini-batch's last micro-batch). FSDP reduce-scatters every micro-batch (see the module docstring)."""
    if not sync and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale the gradients to total norm ``max_norm`` at most; returns the norm before clipping (0-d).

    Under FSDP the gradients are shards (DTensors): their norm is reduced over all ranks first, so every
    rank clips by the same global norm, as in one process.
    """
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def _checkpoint_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):  # DDP, torch.compile
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def full_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a DTensor shard is all-gathered (collective), moved first to the mesh's device
    when it was offloaded to the CPU; a plain tensor is returned as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    if tensor.device.type != mesh.device_type:
        local = tensor.to_local().to(mesh.device_type)
        tensor = DTensor.from_local(
            local, mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
        )
    return tensor.full_tensor()


def full_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model``'s state dict, one whole tensor at a time, in checkpoint naming (``model.layers.0...``).

    A sharded (FSDP) parameter is all-gathered when its turn comes and not kept, so no more than one
    parameter beyond the shards is ever whole. A tied parameter is gathered once and comes under each of its
    names in a row (vLLM needs ``lm_head.weight`` too). Collective under FSDP: every rank must consume the
    whole iterator, in the same order.
    """
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    aliases = {names[0]: names[1:] for names in names_of.values()}
    later = {alias for names in aliases.values() for alias in names}
    for name, tensor in model.state_dict().items():
        if name in later:
            continue
        whole = full_tensor(tensor.detach())
        for each in (name, *aliases.get(name, ())):
            yield _checkpoint_name(each), whole


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` or one of its submodules is FSDP-sharded."""
    return any(isinstance(m, FSDPModule) for m in module.modules())
