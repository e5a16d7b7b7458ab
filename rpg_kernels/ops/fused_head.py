"""The fused LM head, orchestrated: which backend and method compute log-probs, the loss and the gradients.

`rpg_kernels.fused` validates and calls the three entry points here with an `LMHead` and `HeadOptions`:

- `head_logprobs`: per-token ``(logprob, lse, entropy)``;
- `head_logprob_grads`: ``(dh, dW, db)`` from per-token upstream grads (the log-probs' backward);
- `head_loss`: the loss, its metrics and ``(dh, dW, db)`` in one call (the loss is a scalar, so its
  upstream gradient is known at forward time).

=========  ===============  ===================================================================
backend    method           what runs (docs/MATH.md §6)
=========  ===============  ===================================================================
torch      (chunked)        `rpg_kernels.ops.chunked`: PyTorch blocks; one pass for token-level losses
triton     ``single_pass``  `rpg_kernels.ops.single_pass`: cuBLAS chunk GEMMs + the row kernel
triton     ``fused``        `rpg_kernels.ops.linear_logprobs_forward` / ``_backward``: no ``[C, V]`` chunk
=========  ===============  ===================================================================

Token-level losses (every algo but ``gspo``) take one pass where the method has one; ``gspo`` (and the
``fused`` method) take two: log-probs first, the loss's per-token gradients, then the head's gradients.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig
from rpg_kernels.loss import loss_and_logprob_grads, loss_metrics
from rpg_kernels.loss.aggregation import aggregation_weights
from rpg_kernels.loss.inputs import LossInputs, prepare_loss_inputs
from rpg_kernels.loss.streaming import StreamingLoss, supports_streaming
from rpg_kernels.ops import chunked
from rpg_kernels.ops.lm_head import HeadGrads, HeadOptions, LMHead, UpstreamGrads

__all__ = ["head_logprobs", "head_logprob_grads", "head_loss"]


def head_logprobs(
    head: LMHead, options: HeadOptions, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(logprob, lse, entropy | None)``, each ``[N]`` fp32 (fp64 for fp64 inputs); 0 for ignored tokens."""
    if head.n_tokens == 0:
        empty = head.hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty, (empty if with_entropy else None)
    if options.backend == "torch":
        return chunked.chunked_forward(head, with_entropy, _block_elements(head, options))
    if options.method == "fused":
        from rpg_kernels.ops.linear_logprobs_forward import linear_logprobs_forward

        return linear_logprobs_forward(head, with_entropy)
    from rpg_kernels.ops.single_pass import single_pass_logprobs

    out = single_pass_logprobs(head, options)
    return out.logprob, out.lse, (out.entropy if with_entropy else None)


def head_logprob_grads(
    head: LMHead, lse: Tensor, entropy: Tensor | None, grads: UpstreamGrads, options: HeadOptions
) -> HeadGrads:
    """``(dh, dW, db)`` of ``sum(g_l * logprob + g_H * entropy)``; ignored tokens get no gradient."""
    if head.n_tokens == 0:
        need_h, need_w, need_b = options.need
        zeros = lambda t, need: torch.zeros_like(t) if need and t is not None else None  # noqa: E731
        return HeadGrads(zeros(head.hidden, need_h), zeros(head.weight, need_w), zeros(head.bias, need_b))
    if options.backend == "torch":
        return chunked.chunked_backward(
            head, lse, entropy, grads, options.need, _block_elements(head, options)
        )
    if options.method == "fused":
        from rpg_kernels.ops.linear_logprobs_backward import linear_logprobs_backward

        return linear_logprobs_backward(
            head, lse, entropy, grads, options.need, options.deterministic, options.lap
        )
    from rpg_kernels.ops.single_pass import single_pass_backward

    return single_pass_backward(head, lse, entropy, grads, options)


def head_loss(
    head: LMHead,
    inputs: LossInputs,
    config: LossConfig,
    num_items: float | int | Tensor | None,
    entropy_coef: float,
    options: HeadOptions,
) -> tuple[Tensor, dict[str, Tensor], HeadGrads | None]:
    """The loss of docs/MATH.md §3-4 on the head's log-probs: ``(loss 0-d, metrics, grads | None)``.

    ``inputs``: validated by `rpg_kernels.loss.inputs.validate_loss_inputs`, ``[B, T]`` with ``B * T = N``,
    its ``mask`` already excluding ``ignore_index`` targets. ``grads`` is None when ``options.need`` is
    all False (then only the loss and metrics are computed).
    """
    # masked-out tokens run nowhere: every backend skips tokens without a target
    head = replace(head, targets=torch.where(inputs.mask.reshape(-1), head.targets, head.ignore_index))
    dtype = torch.promote_types(inputs.dtype, chunked.compute_dtype(head.hidden.dtype))
    prepared = prepare_loss_inputs(replace(inputs, dtype=dtype))
    weights = aggregation_weights(prepared.mask, config.agg, num_items, dtype, config.max_completion_length)
    need_grads = any(options.need)
    if need_grads and supports_streaming(config):
        block = _block_elements(head, options)
        if options.backend == "torch" and chunked.single_pass_fits(head.vocab, block):
            stream = StreamingLoss(prepared, weights, config, entropy_coef)
            grads = chunked.chunked_forward_backward(
                head, prepared.mask.reshape(-1), stream.token_grads, options.need, block
            )
            loss, metrics = stream.finish()
            return loss, metrics, grads
        if options.backend == "triton" and options.method == "single_pass":
            return _single_pass_loss(head, prepared, weights, config, entropy_coef, options)

    # two passes: log-probs (and entropies), the loss's per-token gradients, then the head's gradients
    options.lap("prepare")
    logprob, lse, entropy = head_logprobs(head, options, with_entropy=True)
    options.lap("forward")
    shape = prepared.shape
    logprob, entropy = logprob.reshape(shape), entropy.reshape(shape)
    if options.backend == "triton" and supports_streaming(config):
        from rpg_kernels.ops.token_loss_epilogue import epilogue_loss_and_grads

        loss, g_l, g_h, metrics = epilogue_loss_and_grads(
            prepared, weights, config, logprob, entropy, entropy_coef
        )
    else:
        loss, g_l, g_h, metrics = loss_and_logprob_grads(
            logprob,
            prepared.old_logprobs,
            prepared.advantages,
            prepared.mask,
            prepared.ref_logprobs,
            config,
            num_items,
            entropy=entropy,
            entropy_coef=entropy_coef,
            rollout_weights=prepared.rollout_weights,
        )
    options.lap("epilogue")
    if not need_grads:
        return loss, metrics, None
    g_h = g_h.reshape(-1) if entropy_coef != 0.0 else None
    upstream = UpstreamGrads(g_l.reshape(-1), g_h)
    grads = head_logprob_grads(head, lse, entropy.reshape(-1), upstream, options)
    options.lap("finish")
    return loss, metrics, grads


def _block_elements(head: LMHead, options: HeadOptions) -> int:
    """The PyTorch path's block, in logits: ``workspace_bytes`` of the accumulation dtype."""
    itemsize = torch.finfo(chunked.compute_dtype(head.hidden.dtype)).bits // 8
    return max(1, options.workspace_bytes // itemsize)


def _single_pass_loss(
    head: LMHead,
    prepared: LossInputs,
    weights: Tensor,
    config: LossConfig,
    entropy_coef: float,
    options: HeadOptions,
) -> tuple[Tensor, dict[str, Tensor], HeadGrads]:
    from rpg_kernels.ops.single_pass import TokenLossProblem, single_pass_loss
    from rpg_kernels.ops.token_loss_epilogue import ZONE_DUAL, ZONE_HIGH, ZONE_LOW

    flat = lambda t: None if t is None else t.expand(prepared.shape).reshape(-1)  # noqa: E731
    problem = TokenLossProblem(
        old=flat(prepared.old_logprobs),
        ref=flat(prepared.ref_logprobs),
        adv=flat(prepared.advantages),
        weight=flat(weights),
        rollout_weight=flat(prepared.rollout_weights),
        keep=flat(prepared.mask),
        config=config,
        entropy_coef=entropy_coef,
    )
    out, grads = single_pass_loss(head, problem, options)
    shape = prepared.shape
    per_token_loss, entropy = out.loss.reshape(shape), out.entropy.to(weights.dtype).reshape(shape)
    loss = (per_token_loss * weights).sum()
    if entropy_coef != 0.0:
        loss = loss - entropy_coef * (entropy * weights).sum()
    zone = out.zone.reshape(shape)
    metrics = loss_metrics(
        prepared.mask,
        out.kl.reshape(shape),
        out.ratio.reshape(shape),
        zone == ZONE_LOW,
        zone == ZONE_HIGH,
        zone == ZONE_DUAL,
        entropy,
    )
    options.lap("finish")
    return loss, metrics, grads
