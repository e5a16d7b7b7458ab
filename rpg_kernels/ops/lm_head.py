"""The LM-head problem every backend receives, its options, and the GEMM helpers the chunked paths share.

``z = (hidden @ weight.T + bias) / temperature`` (docs/MATH.md §6). The dataclasses replace positional
argument lists: `LMHead` holds the validated tensors, `UpstreamGrads` the per-token gradients reaching
the log-probs and entropies, `HeadGrads` what comes back, `HeadOptions` every non-tensor choice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

DEFAULT_WORKSPACE_BYTES = 1 << 30  # the Triton single pass's [C, V] logits chunk + its dz, at most 1 GiB
TORCH_WORKSPACE_BYTES = 1 << 26  # the PyTorch path's logits block: 64 MiB of fp32 (+ 4 MiB scratch)


def default_workspace_bytes(backend: str) -> int:
    """``workspace_bytes`` when the caller gives none: 1 GiB for Triton, 64 MiB for the PyTorch path."""
    return DEFAULT_WORKSPACE_BYTES if backend == "triton" else TORCH_WORKSPACE_BYTES


FP16_DZ_TARGET = 2.0**14  # the largest |dz| after the fp16 scaling: headroom below fp16's 65504


@dataclass(frozen=True)
class LMHead:
    """A validated LM-head problem.

    ``hidden [N, H]`` and ``weight [V, H]`` in one operand dtype (fp16, bf16, fp32; fp64 on the torch
    backend) with contiguous rows; ``bias [V]`` or None; ``targets [N]`` int64 in ``[0, V)`` or
    ``ignore_index`` (no log-prob, no gradient).
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    targets: Tensor
    temperature: float = 1.0
    ignore_index: int = -100

    @property
    def n_tokens(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def valid(self) -> Tensor:
        """``[N]`` bool: tokens with a target."""
        return self.targets != self.ignore_index


@dataclass(frozen=True)
class UpstreamGrads:
    """Per-token gradients reaching the head's outputs: ``logprob [N]`` (``g_l``), ``entropy [N]``
    (``g_H``) or None. Any float dtype; ignored tokens' entries are never read."""

    logprob: Tensor
    entropy: Tensor | None = None


@dataclass(frozen=True)
class HeadGrads:
    """``(dh [N, H], dW [V, H], db [V])``, None where not needed. In the caller's dtypes, or kept in
    fp32 when ``fp32_until_backward`` (fp16 operands: GradScaler's factor is applied before rounding)."""

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    fp32_until_backward: bool = False


@dataclass(frozen=True)
class HeadOptions:
    """Every non-tensor option of a fused call.

    ``backend``: ``"triton"`` or ``"torch"``; ``method`` (Triton only): ``"single_pass"`` (cuBLAS chunk
    GEMMs + the Triton row kernel, the default) or ``"fused"`` (the Triton kernels that never hold a
    ``[C, V]`` chunk); ``deterministic``: the fused backward without atomics; ``workspace_bytes``: the
    budget for the ``[C, V]`` buffers of the single pass and of the PyTorch path's blocks
    (`default_workspace_bytes`); ``need``: which of ``(dh, dW, db)`` to compute; ``laps``: called with a
    phase's name as each phase ends (``bench.phases`` times the phases with it).
    """

    backend: str = "torch"
    method: str = "single_pass"
    deterministic: bool = True
    workspace_bytes: int = TORCH_WORKSPACE_BYTES
    need: tuple[bool, bool, bool] = (True, True, True)
    laps: Callable[[str], None] | None = None

    def lap(self, phase: str) -> None:
        """Mark the end of ``phase`` (nothing without a ``laps`` hook)."""
        if self.laps is not None:
            self.laps(phase)


def fp16_scale(peak: float) -> float:
    """A power of two taking ``peak`` (a bound on ``max |dz|``) to about `FP16_DZ_TARGET`: fp16's ``dz``
    then stays out of the subnormal range, and unscaling in the fp32 GEMM results is exact."""
    if not math.isfinite(peak) or peak <= 0.0:
        return 1.0
    return 2.0 ** max(-120, min(120, math.floor(math.log2(FP16_DZ_TARGET / peak))))


_WARNED_FALLBACK = False


def _out_dtype_supported(a: Tensor) -> bool:
    """cuBLAS GEMMs with fp16/bf16 operands and an fp32 result (``out_dtype=``) exist for CUDA only."""
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16)


def _fallback_warning() -> None:
    global _WARNED_FALLBACK
    if not _WARNED_FALLBACK:
        _WARNED_FALLBACK = True
        warnings.warn(
            "this torch has no torch.mm(..., out_dtype=torch.float32) for 16-bit CUDA operands: the fused "
            "loss upcasts its GEMM operands to fp32 instead (correct, slower). Upgrade torch (>= 2.8).",
            stacklevel=3,
        )


def mm_fp32(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``out = a @ b`` with ``out`` fp32 and ``a``, ``b`` in the operand dtype (fp32 accumulation).

    16-bit operands are multiplied exactly as cuBLAS does it, with an fp32 result (never rounded to 16
    bits); elsewhere (CPU, or a torch without ``out_dtype``) the operands are upcast.
    """
    if a.dtype == torch.float32 or a.dtype == torch.float64:
        return torch.mm(a, b, out=out)
    if _out_dtype_supported(a):
        try:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            _fallback_warning()
    return torch.mm(a.float(), b.float(), out=out)


def addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """``acc += alpha * (a @ b)`` in place, ``acc`` fp32 (or fp64), ``a``, ``b`` in the operand dtype.

    No ``acc``-sized temporary: 16-bit CUDA operands use ``addmm(out_dtype=fp32, out=acc)``; the fallback
    (CPU, old torch) works on row slabs of ``acc`` so that a temporary stays small.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, alpha=alpha)
        return
    if _out_dtype_supported(a):
        try:
            torch.addmm(acc, a, b, alpha=alpha, out_dtype=acc.dtype, out=acc)
            return
        except (TypeError, RuntimeError):
            _fallback_warning()
    slab = max(1, (1 << 24) // max(1, b.shape[1]))
    for start in range(0, a.shape[0], slab):
        rows = slice(start, start + slab)
        acc[rows].addmm_(a[rows].to(acc.dtype), b.to(acc.dtype), alpha=alpha)
