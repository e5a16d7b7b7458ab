"""Public fused entry points (docs/MATH.md §6-7): hidden states -> log-probs / loss, never ``[N, V]`` logits.

Both functions validate every input before any kernel runs, then call the orchestrator
(`rpg_kernels.ops.fused_head`) through an autograd Function. ``backend="auto"`` runs Triton for CUDA
tensors and the chunked PyTorch path otherwise; on Triton, ``method="auto"`` is the single pass (cuBLAS
chunk GEMMs and one row kernel, a ``[C, V]`` workspace of at most ``workspace_bytes``) and
``method="fused"`` the Triton kernels that hold no ``[C, V]`` chunk at all (the least memory, slower).
The PyTorch path's blocks of logits fit ``workspace_bytes`` too (64 MiB by default).

Dtypes (docs/MATH.md §8): ``hidden``/``weight`` in fp16, bf16 or fp32 (fp64 on the torch backend, for
gradcheck). The products run in the activation dtype -- the autocast dtype when autocast is on, else
``hidden``'s -- so bf16 activations with an fp32 LM head (fp32 master weights) use the bf16 tensor cores;
gradients come back in each input's own dtype from fp32 accumulators. Log-probs and entropies are fp32
(fp64 for fp64 inputs) whatever the input dtype: the ratio ``exp(l - l_old)`` needs more than 8 bits.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rpg_kernels.checks import (
    check_float_dtype,
    check_int_dtype,
    check_positive_number,
    check_same_device,
    check_shape,
    check_targets_in_range,
    check_tensor,
)
from rpg_kernels.config import LossConfig, resolve_loss_config
from rpg_kernels.loss.inputs import validate_loss_inputs
from rpg_kernels.ops.autograd import LinearLogprobs, PrecomputedGrads, caller_grads, make_head
from rpg_kernels.ops.dispatch import resolve_backend, resolve_method
from rpg_kernels.ops.fused_head import head_loss
from rpg_kernels.ops.lm_head import HeadOptions, default_workspace_bytes

__all__ = ["fused_linear_logprobs", "fused_linear_rpg_loss"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _validate_head(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
    method: str,
    deterministic: bool,
    workspace_bytes: int | None,
) -> tuple[Tensor, Tensor, tuple[torch.dtype, float, int], HeadOptions]:
    """Check the LM-head arguments; return ``(hidden [N, H], targets [N] int64, head_args, options)``."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("targets", targets)
    check_float_dtype("hidden", hidden)
    check_float_dtype("weight", weight)
    check_float_dtype("bias", bias)
    check_int_dtype("targets", targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    temperature = check_positive_number("temperature", temperature)
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1
    ):
        raise ValueError(f"workspace_bytes must be a positive int (bytes), got {workspace_bytes!r}")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.device.type == "meta":
        raise ValueError("hidden is on the meta device: the fused functions need real tensors")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [B, T, H] or [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)}, expected [V, {hidden.shape[-1]}] with V >= 1 "
            "(the last dim of hidden)"
        )
    if hidden.shape[-1] == 0:
        raise ValueError("hidden has hidden size 0")
    check_shape("bias", bias, (weight.shape[0],))
    check_shape("targets", targets, hidden.shape[:-1])
    check_targets_in_range("targets", targets, weight.shape[0], ignore_index)
    backend = resolve_backend(backend, hidden.device)
    method = resolve_method(method, backend)

    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    allowed = _KERNEL_DTYPES + ((torch.float64,) if backend == "torch" else ())
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be one of {allowed} on backend {backend!r}, got {t.dtype}")
    if dtype not in allowed:
        raise TypeError(f"hidden: the autocast dtype {dtype} is not one of {allowed} on backend {backend!r}")
    if workspace_bytes is None:
        workspace_bytes = default_workspace_bytes(backend)
    options = HeadOptions(
        backend=backend, method=method, deterministic=deterministic, workspace_bytes=workspace_bytes
    )
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden.reshape(-1, hidden.shape[-1]), targets, (dtype, temperature, ignore_index), options


def fused_linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    *,
    backend: str = "auto",
    method: str = "auto",
    deterministic: bool = True,
    workspace_bytes: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log softmax(z)[y]`` (and entropy) of ``z = (hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]``.
        weight: LM head ``[V, H]``; ``bias``: ``[V]`` or None.
        targets: integer ``hidden.shape[:-1]``, in ``[0, V)`` or ``ignore_index`` (logprob 0, entropy 0,
            no gradient).
        return_entropy: also return ``entropy = lse - sum(softmax(z) * z)`` (differentiable).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``; method: ``"auto"``, ``"single_pass"`` or
            ``"fused"`` (Triton); deterministic: the fused backward without atomics; workspace_bytes:
            the budget of the ``[C, V]`` logits buffers (default 1 GiB for Triton's single pass, 64 MiB
            for the PyTorch path's blocks).

    Returns:
        ``logprobs`` shaped like ``targets`` (fp32), or ``(logprobs, entropy)``.
    """
    lead_shape = targets.shape if isinstance(targets, Tensor) else None
    h, y, head_args, options = _validate_head(
        hidden,
        weight,
        targets,
        bias,
        temperature,
        ignore_index,
        backend,
        method,
        deterministic,
        workspace_bytes,
    )
    with torch.autocast(h.device.type, enabled=False):
        out = LinearLogprobs.apply(h, weight, bias, y, head_args, options, bool(return_entropy))
    if return_entropy:
        return out[0].reshape(lead_shape), out[1].reshape(lead_shape)
    return out.reshape(lead_shape)


def fused_linear_rpg_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    config: LossConfig | None = None,
    temperature: float = 1.0,
    bias: Tensor | None = None,
    entropy_coef: float = 0.0,
    num_items: float | int | Tensor | None = None,
    *,
    ignore_index: int = -100,
    rollout_logprobs: Tensor | None = None,
    rollout_weights: Tensor | None = None,
    backend: str = "auto",
    method: str = "auto",
    deterministic: bool = True,
    workspace_bytes: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``rpg_loss(fused_linear_logprobs(hidden, weight, targets, ...), old_logprobs, ...)``, grads included.

    The input grads are computed inside this call (the loss is a scalar, so its upstream grad is known)
    and ``loss.backward()`` only scales them. Token-level algos (all but ``gspo``) take one pass over the
    vocabulary per token chunk: its logits give the log-probs, the per-token loss gradients and the
    chunk's share of ``dh``, ``dW``, ``db`` (``6 N H V`` flops). Tokens whose target is ``ignore_index``
    count as masked out (docs/MATH.md §8). ``rollout_logprobs`` (the sampler's log-probs, with
    ``config.rollout_is``) or ``rollout_weights`` apply the rollout correction of docs/MATH.md §9.

    The per-token tensors are ``hidden.shape[:-1]`` (``advantages`` may be ``[B]``); the other keywords as
    in `fused_linear_logprobs`. Returns ``(loss 0-d, metrics)`` as `rpg_kernels.rpg_loss` does
    (``metrics["entropy"]`` included).
    """
    config = resolve_loss_config(config)
    h, y, head_args, options = _validate_head(
        hidden,
        weight,
        targets,
        bias,
        temperature,
        ignore_index,
        backend,
        method,
        deterministic,
        workspace_bytes,
    )
    check_tensor("mask", mask)
    check_shape("mask", mask, targets.shape)
    keep = (mask != 0) & (targets != ignore_index)
    inputs = validate_loss_inputs(
        None,
        old_logprobs,
        advantages,
        keep,
        ref_logprobs,
        config=config,
        num_items=num_items,
        entropy_coef=entropy_coef,
        rollout_logprobs=rollout_logprobs,
        rollout_weights=rollout_weights,
    )
    _check_finite_head(h, weight, bias, keep.reshape(-1))
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    need = need if torch.is_grad_enabled() else (False, False, False)
    head = make_head(h, weight, bias, y, *head_args)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        loss, metrics, grads = head_loss(
            head, inputs, config, num_items, float(entropy_coef), replace(options, need=need)
        )
    if grads is None:
        return loss, metrics
    return PrecomputedGrads.apply(
        loss, hidden, weight, bias, *caller_grads(grads, hidden, weight, bias)
    ), metrics


def _check_finite_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, keep: Tensor) -> None:
    """Non-finite hidden rows of masked-in tokens or a non-finite LM head make the loss NaN. One sync."""
    with torch.no_grad():
        flags = [
            (~torch.isfinite(hidden) & keep[:, None]).any(),
            ~torch.isfinite(weight).all(),
            torch.zeros((), dtype=torch.bool, device=hidden.device)
            if bias is None
            else ~torch.isfinite(bias).all(),
        ]
        bad = torch.stack(flags).tolist()
    for name, is_bad in zip(("hidden", "weight", "bias"), bad):
        if is_bad:
            where = " on masked-in tokens" if name == "hidden" else ""
            raise ValueError(f"{name} has non-finite value(s){where}")
