"""Public fused entry points (docs/MATH.md §6-7): hidden states -> log-probs / loss, never ``[N, V]`` logits.

Both functions validate every input before any kernel runs, then dispatch (``rpg_kernels.ops.dispatch``)
to the Triton kernels (CUDA tensors, or the CPU interpreter under ``TRITON_INTERPRET=1``) or to the
chunked PyTorch path (``backend="torch"``, the default for CPU tensors).

Dtypes: ``hidden``/``weight`` in fp16, bf16 or fp32 (fp64 on the torch backend, for gradcheck). When
they differ (e.g. bf16 activations under autocast with an fp32 LM head) both are cast to the autocast
dtype if autocast is on, else to the promoted dtype; gradients flow back through the cast. Log-probs and
entropies are returned in fp32 (fp64 for fp64 inputs) whatever the input dtype: the importance ratio
``exp(l - l_old)`` of RL losses needs more than bf16's 8 bits. Gradients come back in the input dtypes;
all accumulation is fp32.
"""

from __future__ import annotations

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
from rpg_kernels.loss import loss_and_logprob_grads, validate_loss_inputs
from rpg_kernels.loss.streaming import StreamingLoss, supports_streaming
from rpg_kernels.ops.autograd import LinearLogprobs, PrecomputedGrads, backward_op, forward_op
from rpg_kernels.ops.chunked import chunked_forward_backward, compute_dtype, single_pass_fits
from rpg_kernels.ops.dispatch import resolve_backend

__all__ = ["fused_linear_logprobs", "fused_linear_rpg_loss"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _prepare_linear_inputs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None,
    temperature: float,
    ignore_index: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, float, str]:
    """Validate; return ``(hidden [N, H], weight [V, H], bias, targets [N] int64, temperature, backend)``."""
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_tensor("targets", targets)
    check_float_dtype("hidden", hidden)
    check_float_dtype("weight", weight)
    check_float_dtype("bias", bias)
    check_int_dtype("targets", targets)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    temperature = check_positive_number("temperature", temperature)
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
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

    if hidden.dtype != weight.dtype:
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    allowed = _KERNEL_DTYPES + ((torch.float64,) if backend == "torch" else ())
    if hidden.dtype not in allowed:
        raise TypeError(f"hidden must be one of {allowed} on backend {backend!r}, got {hidden.dtype}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(-1) != 1:
        bias = bias.contiguous()
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    return hidden, weight, bias, targets, temperature, backend


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
    deterministic: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token ``log softmax(z)[y]`` (and entropy) of ``z = (hidden @ weight.T + bias) / temperature``.

    Args:
        hidden: ``[B, T, H]`` or ``[N, H]``.
        weight: LM head ``[V, H]``; ``bias``: ``[V]`` or None.
        targets: integer ``hidden.shape[:-1]``, in ``[0, V)`` or ``ignore_index`` (logprob 0, entropy 0,
            no gradient).
        return_entropy: also return ``entropy = lse - sum(softmax(z) * z)`` (differentiable).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        deterministic: Triton backward without atomics (``"gemm"`` method of
            `rpg_kernels.ops.linear_logprobs_backward`); False: the single atomic kernel.

    Returns:
        ``logprobs`` shaped like ``targets`` (fp32), or ``(logprobs, entropy)``.
    """
    lead_shape = targets.shape if isinstance(targets, Tensor) else None
    h, w, b, y, temperature, backend = _prepare_linear_inputs(
        hidden, weight, targets, bias, temperature, ignore_index, backend
    )
    with torch.autocast(h.device.type, enabled=False):
        out = LinearLogprobs.apply(
            h, w, b, y, temperature, ignore_index, bool(return_entropy), backend, bool(deterministic)
        )
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
    backend: str = "auto",
    deterministic: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``rpg_loss(fused_linear_logprobs(hidden, weight, targets, ...), old_logprobs, ...)``, grads included.

    The input grads are computed inside this call (the loss is a scalar, so its upstream grad is known)
    and ``loss.backward()`` only scales them. Two passes over the logits in general: pass 1 computes
    per-token log-probs and entropies, ``loss_and_logprob_grads`` turns them into the loss, the metrics
    and the per-token grads ``g_l``, ``g_H``, and pass 2 the grads of ``hidden``, ``weight``, ``bias``
    (docs/MATH.md §6). On the torch backend, for token-level algos (all but ``gspo``) and vocabularies up to
    262144 (`rpg_kernels.ops.chunked.single_pass_fits`), one pass: each token chunk's logits give its
    log-probs, loss grads and input grads at once (`rpg_kernels.loss.streaming`).

    The per-token tensors are ``hidden.shape[:-1]`` (``advantages`` may be ``[B]``).
    Returns ``(loss 0-d, metrics)`` as `rpg_kernels.rpg_loss` does (``metrics["entropy"]`` included).
    """
    config = resolve_loss_config(config)
    if isinstance(entropy_coef, bool) or not isinstance(entropy_coef, (int, float)):
        raise TypeError(f"entropy_coef must be a real number, got {type(entropy_coef).__name__}")
    check_tensor("hidden", hidden)
    check_tensor("targets", targets)
    check_tensor("old_logprobs", old_logprobs)
    if hidden.dim() in (2, 3):
        check_shape("targets", targets, hidden.shape[:-1])
    check_shape("old_logprobs", old_logprobs, targets.shape)
    validate_loss_inputs(old_logprobs, old_logprobs, advantages, mask, ref_logprobs)
    h, w, b, y, temperature, backend = _prepare_linear_inputs(
        hidden, weight, targets, bias, temperature, ignore_index, backend
    )
    check_same_device(hidden=h, old_logprobs=old_logprobs)
    need = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad)
    need = need if torch.is_grad_enabled() else (False, False, False)
    single_pass = backend == "torch" and any(need) and supports_streaming(config)
    single_pass = single_pass and single_pass_fits(w.shape[0])
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        if single_pass:
            stream = StreamingLoss(
                compute_dtype(h.dtype),
                old_logprobs,
                advantages,
                mask,
                ref_logprobs,
                config,
                num_items,
                float(entropy_coef),
            )
            _, _, grads = chunked_forward_backward(
                h, w, b, y, stream.token_grads, temperature, ignore_index, need
            )
            loss, metrics = stream.finish()
        else:
            logprob, lse, entropy = forward_op(backend, h, w, b, y, temperature, ignore_index, True)
            loss, grad_logprob, grad_entropy, metrics = loss_and_logprob_grads(
                logprob.reshape(targets.shape),
                old_logprobs,
                advantages,
                mask,
                ref_logprobs,
                config,
                num_items,
                entropy=entropy.reshape(targets.shape),
                entropy_coef=float(entropy_coef),
                backend=backend,
            )
            if any(need):
                grad_entropy = grad_entropy.reshape(-1) if entropy_coef != 0.0 else None
                grads = backward_op(
                    backend,
                    h,
                    w,
                    b,
                    y,
                    lse,
                    entropy,
                    grad_logprob.reshape(-1),
                    grad_entropy,
                    temperature,
                    ignore_index,
                    need,
                    deterministic,
                )
    if not any(need):
        return loss, metrics
    return PrecomputedGrads.apply(loss, hidden, weight, bias, *_to_callers(grads, hidden, weight)), metrics


def _to_callers(
    grads: tuple[Tensor | None, ...], hidden: Tensor, weight: Tensor
) -> tuple[Tensor | None, ...]:
    """``(dh, dW, db)`` in the caller's shapes and dtypes (undoing any autocast/promotion cast)."""
    grad_h, grad_w, grad_b = grads
    grad_h = grad_h.reshape(hidden.shape).to(hidden.dtype) if grad_h is not None else None
    grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
    return grad_h, grad_w, grad_b
