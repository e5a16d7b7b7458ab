"""``torch.autograd.Function``s of the fused linear log-probs and of the fused loss.

``LinearLogprobs``: forward runs `rpg_kernels.ops.fused_head.head_logprobs` and saves ``lse`` (and
``entropy``); backward recomputes the logits from the per-token upstream grads (docs/MATH.md §6).
``PrecomputedGrads``: the fused loss computes its input grads inside its forward call (the upstream grad
of a scalar loss is known then), so backward only scales them by ``grad_output``.

Both receive the caller's tensors and cast them to the operand dtype themselves (`make_head`), so that
gradients reach the caller in its own dtypes from fp32 accumulators: an fp32 LM head under bf16
activations gets an fp32 ``dW``, not an upcast bf16 one. fp16 gradients stay in fp32 until backward, where
``grad_output`` (GradScaler's factor) is applied before they are rounded to fp16.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rpg_kernels.ops.fused_head import head_logprob_grads, head_logprobs
from rpg_kernels.ops.lm_head import HeadGrads, LMHead, UpstreamGrads

__all__ = ["LinearLogprobs", "PrecomputedGrads", "make_head", "caller_grads"]


def make_head(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    dtype: torch.dtype,
    temperature: float,
    ignore_index: int,
) -> LMHead:
    """The `LMHead` of ``hidden [N, H]``, ``weight [V, H]`` in the operand ``dtype`` (rows contiguous)."""

    def operand(t: Tensor) -> Tensor:
        t = t.detach().to(dtype)
        return t if t.stride(-1) == 1 else t.contiguous()

    bias = None if bias is None else operand(bias)
    return LMHead(operand(hidden), operand(weight), bias, targets, temperature, ignore_index)


def caller_grads(
    grads: HeadGrads, hidden: Tensor, weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, ...]:
    """``(dh, dW, db)`` shaped like the caller's tensors, in their dtypes (fp16 ones: kept fp32 for now)."""
    out = []
    for grad, like in ((grads.hidden, hidden), (grads.weight, weight), (grads.bias, bias)):
        if grad is None or like is None:
            out.append(None)
            continue
        grad = grad.reshape(like.shape)
        out.append(grad if like.dtype == torch.float16 else grad.to(like.dtype))
    return tuple(out)


class LinearLogprobs(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], bias [V] | None, targets [N]) -> logprob [N] (, entropy [N])``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head_args, options, with_entropy):
        dtype, temperature, ignore_index = head_args
        head = make_head(hidden, weight, bias, targets, dtype, temperature, ignore_index)
        logprob, lse, entropy = head_logprobs(head, options, with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.head_args, ctx.options = head_args, options
        ctx.set_materialize_grads(False)
        if with_entropy:
            return logprob, entropy
        return logprob

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logprob is None and grad_entropy is None:
            return (None,) * 7
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        options = replace(ctx.options, need=(need_h, need_w, bias is not None and need_b))
        head = make_head(hidden, weight, bias, targets, *ctx.head_args)
        grad_logprob = torch.zeros_like(lse) if grad_logprob is None else grad_logprob
        grads = head_logprob_grads(head, lse, entropy, UpstreamGrads(grad_logprob, grad_entropy), options)
        dh, dw, db = (
            None if g is None else g.to(like.dtype)
            for g, like in zip(caller_grads(grads, hidden, weight, bias), (hidden, weight, bias))
        )
        return dh, dw, db, None, None, None, None


class PrecomputedGrads(torch.autograd.Function):
    """Identity on a 0-d ``loss`` whose grads w.r.t. ``hidden``, ``weight``, ``bias`` are already known.

    ``apply(loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias)``; backward returns the
    saved grads times ``grad_output`` in the inputs' dtypes (no copy when it is exactly 1 and the dtypes
    match, the usual ``loss.backward()``).
    """

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        scale = None if torch.equal(grad_output, torch.ones_like(grad_output)) else grad_output
        out = []
        for grad, dtype in zip(grads, ctx.dtypes):
            if grad is None:
                out.append(None)
                continue
            if scale is not None:
                grad = grad * scale.to(grad.dtype)
            out.append(grad.to(dtype))
        return (None, *out, None, None, None)
