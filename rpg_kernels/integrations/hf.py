"""transformers ``*ForCausalLM`` models: completion hidden states and the LM head, never logits.

The fused losses take the last hidden states and the LM-head weight instead of ``[N, V]`` logits::

    weight, bias = lm_head_params(model)
    hidden = completion_hidden_states(model, input_ids, attention_mask, logits_to_keep=K)   # [B, K, H]
    logp = rk.fused_linear_logprobs(hidden, weight, input_ids[:, -K:], bias=bias)         # [B, K]

``logp`` equals ``log_softmax(model(input_ids, attention_mask).logits)`` gathered at the targets.
Sequences packed back to back in one row (no padding, ``position_ids`` restarting at 0 for each, as
transformers' ``DataCollatorWithFlattening`` lays them out) go through :func:`packed_hidden_states` instead.

Under DistributedDataParallel, FSDP or DeepSpeed the whole computation (backbone *and* fused loss) must run
inside the wrapper's forward, or gradients are not synchronised; :func:`run_inside_forward` does that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "completion_hidden_states",
    "lm_head_params",
    "packed_hidden_states",
    "run_inside_forward",
    "unwrap_model",
]

T = TypeVar("T")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/FSDP/DeepSpeed (``.module``) and PEFT (``get_base_model()``)."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):  # DDP, FSDP1, DeepSpeedEngine
            model = model.module
        else:
            return model


def _backbone(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    backbone = getattr(model, "base_model", None)
    if not isinstance(backbone, nn.Module) or backbone is model:
        raise TypeError(
            f"model: expected a transformers *ForCausalLM with a backbone under `base_model` "
            f"(e.g. `model.model`), got {type(model).__name__}"
        )
    return backbone


def lm_head_params(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The LM head of a causal LM: ``weight [V, H]`` and ``bias [V]`` or ``None``.

    Works for tied and untied heads (a tied head *is* the embedding matrix, so its gradient reaches both).
    Models whose logits are not ``h @ W.T + b`` (logit soft-capping or scaling, e.g. Gemma 2, Cohere,
    Granite) are rejected, because the fused kernels would compute different log-probs.
    """
    model = unwrap_model(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    if hasattr(head, "base_layer"):  # a PEFT adapter (e.g. LoRA) on the head: `.weight` misses the adapter
        raise ValueError("model: adapters on the LM head are unsupported; keep lm_head out of target_modules")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise TypeError(f"model: {type(model).__name__} has no linear LM head (`lm_head.weight` [V, H])")
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"):
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"model: config.{name}={value} transforms the logits after the LM head; the fused kernels "
                "compute log_softmax(h @ W.T + b) and do not support it"
            )
    bias = getattr(head, "bias", None)
    return weight, bias if isinstance(bias, Tensor) else None


def completion_hidden_states(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    logits_to_keep: int,
    **backbone_kwargs: Any,
) -> Tensor:
    """Last-layer hidden states (after the final norm) that predict the last ``logits_to_keep`` tokens.

    Args:
        model: a transformers ``*ForCausalLM`` (Llama, Qwen2, Qwen3, ...), optionally PEFT-wrapped.
        input_ids: ``[B, S]`` token ids (prompt + completion).
        attention_mask: ``[B, S]``, 1 on real tokens, 0 on padding (left or right), or ``None``.
        logits_to_keep: ``K``, the number of trailing positions to score, ``1 <= K < S``.
        backbone_kwargs: passed to the backbone (e.g. ``position_ids``).

    Returns:
        ``[B, K, H]`` in the model's dtype: row ``k`` is the hidden state at position ``S-K+k-1``, which
        predicts ``input_ids[:, S-K+k]``. Only the backbone runs (gradient checkpointing included); no logits.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        got = getattr(input_ids, "shape", type(input_ids))
        raise ValueError(f"input_ids: expected a [B, S] tensor, got {got}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask: shape {tuple(attention_mask.shape)} differs from input_ids "
            f"{tuple(input_ids.shape)}"
        )
    seq_len = input_ids.shape[1]
    is_int = isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool)
    if not is_int or not 1 <= logits_to_keep < seq_len:
        raise ValueError(f"logits_to_keep: expected an int in [1, {seq_len - 1}], got {logits_to_keep!r}")
    backbone_kwargs.setdefault("use_cache", False)
    outputs = _backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **backbone_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, seq_len - logits_to_keep - 1 : seq_len - 1]


def packed_hidden_states(
    model: nn.Module, input_ids: Tensor, position_ids: Tensor, rows: Tensor, **backbone_kwargs: Any
) -> Tensor:
    """Last-layer hidden states (after the final norm) of sequences packed into one row, gathered at ``rows``.

    Args:
        model: a transformers ``*ForCausalLM``, optionally PEFT-wrapped.
        input_ids: ``[1, T]``: the sequences back to back, no padding.
        position_ids: ``[1, T]``: each sequence's positions ``0, 1, ...``; the backbone runs without an
            attention mask, so transformers reads the sequence boundaries from them (varlen
            ``flash_attention_2``/``_3``, ``flex_attention``'s block mask, or a ``[T, T]`` block-diagonal mask
            for ``sdpa`` and ``eager``).
        rows: int64 positions in ``[0, T)``, any shape: the position whose hidden state is wanted (the one
            before a target token predicts it).
        backbone_kwargs: passed to the backbone.

    Returns:
        ``[*rows.shape, H]`` in the model's dtype; the gather's backward scatters into the packed row.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        got = getattr(input_ids, "shape", type(input_ids))
        raise ValueError(f"input_ids: expected one packed row [1, T], got {got}")
    if not isinstance(position_ids, Tensor) or position_ids.shape != input_ids.shape:
        got = getattr(position_ids, "shape", type(position_ids))
        raise ValueError(f"position_ids: expected the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    if not isinstance(rows, Tensor) or rows.dtype != torch.int64:
        raise TypeError(f"rows: expected an int64 tensor, got {getattr(rows, 'dtype', type(rows))}")
    backbone_kwargs.setdefault("use_cache", False)  # with a cache transformers ignores the packed positions
    outputs = _backbone(model)(input_ids=input_ids, position_ids=position_ids, **backbone_kwargs)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[0][rows]


def run_inside_forward(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` from inside ``model``'s forward and return its result.

    DDP, FSDP (1 and 2) and DeepSpeed do their work (gradient-sync bookkeeping, parameter all-gather) in hooks
    around ``model(...)``; a loss computed from ``model.model(...)`` and ``model.lm_head.weight`` directly
    skips them. This temporarily replaces the innermost module's ``forward`` by ``fn`` and calls the outermost
    ``model()``, so every wrapper's hooks run around ``fn``. For an unwrapped model it simply calls ``fn``
    through ``model.__call__``. ``fn`` should receive the tensors it needs through ``args``/``kwargs``.
    """
    inner = model
    while isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    had_instance_forward = "forward" in inner.__dict__
    original_forward = inner.__dict__.get("forward")

    def redirected_forward(*_unused_args: Any, **_unused_kwargs: Any) -> T:
        _restore()
        return fn(*args, **kwargs)

    def _restore() -> None:
        if had_instance_forward:
            inner.forward = original_forward
        elif "forward" in inner.__dict__:
            del inner.forward

    inner.forward = redirected_forward
    try:
        return model()
    finally:
        _restore()
