"""``torch.autograd.Function``s of the fused linear log-probs and of the fused RPG loss.

``LinearLogprobs``: forward runs the backend's forward op and saves ``lse`` (and ``entropy``); backward
recomputes the logits tiles from the per-token upstream grads (docs/MATH.md §6). ``PrecomputedGrads``: the
fused loss computes its input grads inside its forward call (the upstream grad of a scalar loss is
known then), so backward only scales them by ``grad_output``.
"""

from __future__ import annotations

import torch

from rpg_kernels.ops.chunked import chunked_backward, chunked_forward


def forward_op(
    backend: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(logprob, lse, entropy | None)``, each ``[N]`` fp32 (fp64 for fp64 inputs), on ``backend``."""
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, (empty if with_entropy else None)
    if backend == "triton":
        from rpg_kernels.ops.linear_logprobs_forward import linear_logprobs_forward

        return linear_logprobs_forward(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)
    return chunked_forward(hidden, weight, bias, targets, temperature, ignore_index, with_entropy)


def backward_op(
    backend: str,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    need: tuple[bool, bool, bool],
    deterministic: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dh, dW, db)`` in the input dtypes (None where ``need`` is False) on ``backend``."""
    need_hidden, need_weight, need_bias = need
    if hidden.shape[0] == 0:
        return (
            torch.zeros_like(hidden) if need_hidden else None,
            torch.zeros_like(weight) if need_weight else None,
            torch.zeros_like(bias) if need_bias and bias is not None else None,
        )
    args = (
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        grad_logprob,
        grad_entropy,
        temperature,
        ignore_index,
        need_hidden,
        need_weight,
        need_bias,
    )
    if backend == "triton":
        from rpg_kernels.ops.linear_logprobs_backward import linear_logprobs_backward

        return linear_logprobs_backward(*args, deterministic=deterministic)
    return chunked_backward(*args)


class LinearLogprobs(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> logprob [N] (, entropy [N])``."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, backend, deterministic
    ):
        logprob, lse, entropy = forward_op(
            backend, hidden, weight, bias, targets, temperature, ignore_index, with_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.options = (temperature, ignore_index, backend, deterministic)
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logprob, entropy
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, backend, deterministic = ctx.options
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need = (need_h, need_w, bias is not None and need_b)
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 9
        if grad_logprob is None:
            grad_logprob = torch.zeros_like(lse)
        dh, dw, db = backward_op(
            backend,
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            grad_logprob,
            grad_entropy,
            temperature,
            ignore_index,
            need,
            deterministic,
        )
        return dh, dw, db, None, None, None, None, None, None


class PrecomputedGrads(torch.autograd.Function):
    """Identity on a 0-d ``loss`` whose grads w.r.t. ``hidden``, ``weight``, ``bias`` are already known.

    ``apply(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)``; backward returns the
    saved grads times ``grad_output`` (no copy when it is exactly 1, the usual ``loss.backward()``).
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        if not torch.equal(grad_output, torch.ones_like(grad_output)):
            grads = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return (None, *grads, None, None, None)
