"""Input checks of docs/MATH.md §7, shared by every public entry point.

Each checker raises ``ValueError`` (or ``TypeError`` for wrong types/dtypes) whose message
starts with the argument's name. ``None`` arguments are skipped where optional inputs are
usual, so callers can pass everything they received.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "check_tensor",
    "check_float_dtype",
    "check_int_dtype",
    "check_shape",
    "check_same_shape",
    "check_same_device",
    "check_finite_masked",
    "check_finite_masked_all",
    "check_targets_in_range",
    "check_positive_number",
    "check_num_items",
]


def check_tensor(name: str, t: object) -> None:
    """``t`` must be a ``torch.Tensor``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(name: str, t: torch.Tensor | None) -> None:
    """``t`` must be a floating-point tensor (fp16, bf16, fp32, fp64)."""
    if t is None:
        return
    check_tensor(name, t)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")


def check_int_dtype(name: str, t: torch.Tensor | None) -> None:
    """``t`` must be an integer tensor (e.g. token ids)."""
    if t is None:
        return
    check_tensor(name, t)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor | None, expected: Sequence[int]) -> None:
    """``t.shape`` must equal ``expected``."""
    if t is None:
        return
    check_tensor(name, t)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(expected)}")


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must have the shape of ``reference``."""
    for name, t in others.items():
        if t is None:
            continue
        check_tensor(name, t)
        if t.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, expected {tuple(reference.shape)} "
                f"(the shape of {reference_name})"
            )


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors must live on one device; the message names the first one that does not."""
    first_name, first_device = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        check_tensor(name, t)
        if first_device is None:
            first_name, first_device = name, t.device
        elif t.device != first_device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first_device}")


def check_finite_masked(name: str, t: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
    """``t`` must be finite wherever ``mask`` is non-zero (everywhere if ``mask`` is None).

    ``mask`` must broadcast against ``t``. Costs one device sync.
    """
    if t is None:
        return
    bad = ~torch.isfinite(t)
    if mask is not None:
        bad = bad & (mask != 0)
    if bool(bad.any()):
        count = int(bad.sum())
        raise ValueError(f"{name} has {count} non-finite value(s) on masked-in tokens")


def check_finite_masked_all(mask: torch.Tensor | None = None, **tensors: torch.Tensor | None) -> None:
    """`check_finite_masked` for several tensors with a single device sync (first offender named)."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    if not named:
        return
    keep = None if mask is None else mask != 0
    flags = []
    for _, t in named:
        bad = ~torch.isfinite(t)
        flags.append((bad if keep is None else bad & keep).any())
    for (name, _), bad in zip(named, torch.stack(flags).tolist()):
        if bad:
            raise ValueError(f"{name} has non-finite value(s) on masked-in tokens")


def check_targets_in_range(
    name: str, targets: torch.Tensor, vocab_size: int, ignore_index: int | None = -100
) -> None:
    """Entries of ``targets`` must lie in ``[0, vocab_size)`` or equal ``ignore_index``. One device sync."""
    check_int_dtype(name, targets)
    valid = (targets >= 0) & (targets < vocab_size)
    if ignore_index is not None:
        valid = valid | (targets == ignore_index)
    if not bool(valid.all()):
        bad = targets[~valid]
        raise ValueError(
            f"{name} has {bad.numel()} value(s) outside [0, {vocab_size}) other than "
            f"ignore_index={ignore_index}, e.g. {int(bad[0])}"
        )


def check_positive_number(name: str, value: object, *, allow_inf: bool = False) -> float:
    """``value`` must be a real number > 0 (finite unless ``allow_inf``); returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be a {'' if allow_inf else 'finite '}number > 0, got {value}")
    return value


def check_num_items(num_items: object, name: str = "num_items") -> None:
    """The global normaliser: None, a number >= 0, or a 0-d/1-element tensor (not checked: no sync)."""
    if num_items is None:
        return
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(num_items.shape)}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, (int, float)):
        raise TypeError(f"{name} must be a number or a 0-d tensor, got {type(num_items).__name__}")
    if not math.isfinite(num_items) or num_items < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {num_items}")
