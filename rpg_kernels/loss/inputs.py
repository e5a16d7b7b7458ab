"""The one validation of a loss call (docs/MATH.md §7), shared by `rpg_loss` and every fused path.

`validate_loss_inputs` checks every argument the per-token loss reads (shapes, dtypes, devices, finite
values on masked-in tokens, ``num_items``, ``entropy_coef``, the rollout correction's inputs) with one
device sync, and views the per-token tensors as ``[B, T]``; `prepare_loss_inputs` then casts them to the
compute dtype and zeroes masked-out entries with ``torch.where`` (masked-out positions may hold anything,
NaN and inf included: they never reach an ``exp``, a ``log`` or a gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from rpg_kernels.checks import check_float_dtype, check_same_device, check_same_shape, check_tensor
from rpg_kernels.config import LossConfig
from rpg_kernels.loss.rollout_correction import rollout_weights as compute_rollout_weights

__all__ = ["LossInputs", "validate_loss_inputs", "prepare_loss_inputs", "compute_dtype"]


@dataclass(frozen=True)
class LossInputs:
    """Validated per-token inputs as ``[B, T]`` views (``advantages`` and ``rollout_weights``: ``[B, 1]``
    or ``[B, T]``). ``logprobs`` is None for the fused losses, which compute it themselves.

    From `validate_loss_inputs` they keep their dtypes and masked-out garbage; from `prepare_loss_inputs`
    they are in ``dtype`` (the compute dtype), expanded to ``[B, T]``, zeros where ``~mask``.
    """

    logprobs: Tensor | None
    old_logprobs: Tensor
    advantages: Tensor
    mask: Tensor  # bool
    ref_logprobs: Tensor | None
    entropy: Tensor | None
    rollout_weights: Tensor | None  # the constant weight of docs/MATH.md §9, None = 1
    dtype: torch.dtype  # fp64 when any float input is fp64, else fp32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp64 when any of ``tensors`` is fp64, else fp32 (fp16/bf16 inputs are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_num_items(num_items: object) -> Tensor | None:
    """Python numbers are checked here; a tensor's value joins the device checks (returned as a flag)."""
    if num_items is None:
        return None
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"num_items must be a scalar, got a tensor of shape {tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"num_items must be a real number or a 0-d real tensor, got {num_items.dtype}")
        value = num_items.detach().reshape(()).double()
        return ~(torch.isfinite(value) & (value >= 0))
    value = _check_real("num_items", num_items)
    if value < 0:
        raise ValueError(f"num_items must be >= 0, got {num_items}")
    return None


def _per_token_shape(name: str, t: Tensor, batch: int, length: int, flat: bool) -> Tensor:
    """``t`` viewed as ``[B, 1]`` or ``[B, T]`` (``advantages``, ``rollout_weights``)."""
    shape = tuple(t.shape)
    if flat and shape in ((length,), (1,)):
        return t.reshape(1, -1)
    if not flat and shape in ((batch,), (batch, 1)):
        return t.reshape(batch, 1)
    if not flat and shape == (batch, length):
        return t
    expected = f"[{length}] or [1]" if flat else f"[{batch}], [{batch}, 1] or [{batch}, {length}]"
    raise ValueError(f"{name} has shape {shape}, expected {expected}")


def validate_loss_inputs(
    logprobs: Tensor | None,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
    *,
    config: LossConfig,
    num_items: float | int | Tensor | None = None,
    entropy_coef: float = 0.0,
    rollout_logprobs: Tensor | None = None,
    rollout_weights: Tensor | None = None,
) -> LossInputs:
    """Every check of docs/MATH.md §7, then the per-token tensors as ``[B, T]`` views (no copies, no casts).

    ``logprobs`` (None for the fused losses: ``old_logprobs`` then sets the shape) is ``[B, T]`` or flat
    ``[N]`` (one sequence); ``old_logprobs``, ``ref_logprobs``, ``mask``, ``entropy``,
    ``rollout_logprobs`` have its shape; ``advantages`` and ``rollout_weights`` are ``[B]``, ``[B, 1]`` or
    ``[B, T]`` (flat: ``[N]`` or ``[1]``). ``rollout_logprobs`` (the sampler's log-probs; NaN = unscored,
    ratio 1) needs ``config.rollout_is``; ``rollout_weights`` is an already computed weight (e.g. TRL's or
    verl's); at most one of them. Raises ``ValueError`` / ``TypeError`` naming the argument.
    """
    shape_name, reference = ("logprobs", logprobs) if logprobs is not None else ("old_logprobs", old_logprobs)
    check_tensor(shape_name, reference)
    check_tensor("old_logprobs", old_logprobs)
    check_tensor("advantages", advantages)
    check_tensor("mask", mask)
    floats = dict(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        advantages=advantages,
        ref_logprobs=ref_logprobs,
        entropy=entropy,
        rollout_logprobs=rollout_logprobs,
        rollout_weights=rollout_weights,
    )
    for name, t in floats.items():
        check_float_dtype(name, t)
    check_same_device(**floats, mask=mask)
    if reference.device.type == "meta":
        raise ValueError(f"{shape_name} is on the meta device: the loss needs real tensors")
    if reference.dim() not in (1, 2):
        raise ValueError(f"{shape_name} must be [B, T] or [N], got shape {tuple(reference.shape)}")
    others = dict(old_logprobs=old_logprobs, mask=mask, ref_logprobs=ref_logprobs, entropy=entropy)
    check_same_shape(shape_name, reference, **others, rollout_logprobs=rollout_logprobs)
    if rollout_logprobs is not None and rollout_weights is not None:
        raise ValueError(
            "rollout_logprobs and rollout_weights: give one (the weights come from the log-probs)"
        )
    if rollout_logprobs is not None and config.rollout_is is None:
        raise ValueError(
            "rollout_logprobs: the config has no rollout correction; set LossConfig(rollout_is=...) "
            "(token_truncate, token_mask, sequence_truncate or sequence_mask)"
        )
    if config.rollout_is is not None and rollout_logprobs is None and rollout_weights is None:
        raise ValueError(
            f"rollout_logprobs: config.rollout_is={config.rollout_is!r} needs the sampler log-probs"
        )
    _check_real("entropy_coef", entropy_coef)
    bad_num_items = _check_num_items(num_items)

    flat = reference.dim() == 1
    batch, length = (1, reference.shape[0]) if flat else tuple(reference.shape)
    advantages = _per_token_shape("advantages", advantages, batch, length, flat)
    if rollout_weights is not None:
        rollout_weights = _per_token_shape("rollout_weights", rollout_weights, batch, length, flat)

    def to_2d(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.reshape(batch, length)

    logprobs, old_logprobs, mask, ref_logprobs, entropy, rollout_logprobs = map(
        to_2d, (logprobs, old_logprobs, mask, ref_logprobs, entropy, rollout_logprobs)
    )
    keep = mask != 0
    # one device sync for every value check: the first offender is named
    named = dict(old_logprobs=old_logprobs, advantages=advantages, ref_logprobs=ref_logprobs)
    named["rollout_weights"] = rollout_weights
    flags = [(~torch.isfinite(t) & keep).any() for t in named.values() if t is not None]
    names = [name for name, t in named.items() if t is not None]
    if rollout_weights is not None:
        flags.append(((rollout_weights < 0) & keep).any())
        names.append("rollout_weights (negative)")
    if bad_num_items is not None:
        flags.append(bad_num_items.to(keep.device))
        names.append("num_items")
    for name, bad in zip(names, torch.stack(flags).tolist()):
        if bad:
            if name == "num_items":
                raise ValueError(f"num_items must be a finite number >= 0, got {num_items.item()}")
            raise ValueError(f"{name} has non-finite value(s) on masked-in tokens")
    if rollout_logprobs is not None:
        rollout_weights = compute_rollout_weights(old_logprobs, rollout_logprobs, keep, config)
    dtype = compute_dtype(logprobs, old_logprobs, advantages, ref_logprobs, entropy)
    return LossInputs(logprobs, old_logprobs, advantages, keep, ref_logprobs, entropy, rollout_weights, dtype)


def _clean(t: Tensor | None, keep: Tensor, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype``, expanded to ``keep``'s shape, 0 where ``~keep`` (before any exp/log)."""
    if t is None:
        return None
    t = t.to(dtype).expand(keep.shape)
    return torch.where(keep, t, torch.zeros((), dtype=dtype, device=t.device))


def prepare_loss_inputs(inputs: LossInputs) -> LossInputs:
    """``inputs`` in the compute dtype, ``[B, T]``, zeros where masked out (the rollout weight: 0 too)."""
    keep, dtype = inputs.mask, inputs.dtype
    return replace(
        inputs,
        logprobs=_clean(inputs.logprobs, keep, dtype),
        old_logprobs=_clean(inputs.old_logprobs, keep, dtype),
        advantages=_clean(inputs.advantages, keep, dtype),
        ref_logprobs=_clean(inputs.ref_logprobs, keep, dtype),
        entropy=_clean(inputs.entropy, keep, dtype),
        rollout_weights=_clean(inputs.rollout_weights, keep, dtype),
    )
