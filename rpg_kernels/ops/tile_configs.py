"""Tile shapes the Triton kernels may launch with, per GPU architecture.

Each kernel family has a small autotune set for ``sm_80`` (A100: ``mma.sync``) and ``sm_90``
(H100/H200: ``wgmma``, which needs ``BLOCK_N >= 64`` row tiles, ``num_warps`` a multiple of 4 and
fp16/bf16 operands). ``tests/ops/test_compile.py`` compiles every entry below for both architectures
(ahead of time, no GPU needed), checks that the sm_90 matmul loops use ``wgmma`` and that the
configurations do not spill registers. Keep these sets small: each entry costs autotuning time on
the first call with a new ``(V, H, N bucket)`` and compile-test time here.

Under the Triton interpreter (``TRITON_INTERPRET=1``, CPU) autotuning would be far too slow, so the
launchers use ``INTERPRETER`` (small tiles, so that masks on odd ``N, V, H`` are exercised).

Kernels and their tile roles (all 1-D grids on axis 0):

- ``forward``: a program owns ``BLOCK_N`` tokens and one slice of the vocabulary; it walks the slice in
  ``BLOCK_V`` columns, each logits tile is a ``tl.dot`` loop over ``H`` in ``BLOCK_H`` steps.
- ``backward_dh``: a program owns ``BLOCK_N`` tokens (rows of ``dh``), walks all of ``V``.
- ``backward_dw``: a program owns ``BLOCK_V`` vocabulary rows (rows of ``dW`` and ``db``), walks all of ``N``.
- ``backward_atomic``: a program owns one ``(BLOCK_N, BLOCK_V)`` tile; ``dh``/``dW`` by atomic adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import triton


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration: tile sizes (constexpr kernel arguments) plus warps and pipeline stages."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict[str, int]:
        """The constexpr keyword arguments of the kernel."""
        return {"BLOCK_N": self.block_n, "BLOCK_V": self.block_v, "BLOCK_H": self.block_h}

    def triton_config(self) -> triton.Config:
        import triton

        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Small tiles for the interpreter: fast enough in NumPy, and smaller than the test shapes.
INTERPRETER = TileConfig(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=1)

# fp16/bf16 operands: tensor-core tiles. Checked with ptxas and the SASS for aligned shapes (H, strides
# multiples of 16, as in every LLM): no spill inside a K loop (tests/ops/test_compile.py); odd H makes
# Triton drop its vectorised loads (still correct).
# Two candidates for the forward, one for each backward kernel (all on the fused path).
_TENSOR_CORE = {
    80: {
        "forward": (
            TileConfig(64, 128, 32, num_warps=4, num_stages=3),
            TileConfig(128, 128, 64, num_warps=8, num_stages=3),
            TileConfig(128, 256, 32, num_warps=8, num_stages=3),  # spills outside the K loop only
        ),
        "backward_dh": (TileConfig(64, 128, 32, num_warps=8, num_stages=3),),
        "backward_dw": (TileConfig(128, 64, 64, num_warps=8, num_stages=3),),
        "backward_atomic": (TileConfig(64, 64, 64, num_warps=4, num_stages=3),),
    },
    90: {
        "forward": (
            TileConfig(64, 128, 64, num_warps=4, num_stages=3),
            TileConfig(128, 128, 64, num_warps=8, num_stages=3),
            TileConfig(128, 256, 64, num_warps=8, num_stages=3),  # spills outside the K loop only
        ),
        "backward_dh": (TileConfig(64, 128, 64, num_warps=8, num_stages=3),),
        "backward_dw": (TileConfig(128, 64, 64, num_warps=8, num_stages=3),),
        "backward_atomic": (TileConfig(128, 64, 64, num_warps=8, num_stages=3),),
    },
}

# fp32 operands: exact ("ieee") products on the CUDA cores, so smaller tiles; one config per kernel.
# The backward ones spill a few dozen bytes on sm_80 (none on sm_90): fp32 is the slow exact path;
# bf16/fp16 are the ones tuned.
_FP32_FORWARD = TileConfig(64, 64, 32, num_warps=4, num_stages=2)
_FP32_BACKWARD = TileConfig(32, 64, 32, num_warps=4, num_stages=2)
_FP32 = {
    cc: {k: (_FP32_FORWARD if k == "forward" else _FP32_BACKWARD,) for k in _TENSOR_CORE[cc]}
    for cc in _TENSOR_CORE
}

KERNELS = ("forward", "backward_dh", "backward_dw", "backward_atomic")
DTYPE_CLASSES = ("tensor_core", "fp32")


def dtype_class(dtype: torch.dtype | str) -> str:
    """``"fp32"`` for float32 operands (torch dtype or Triton type string), else ``"tensor_core"``."""
    return "fp32" if str(dtype) in ("torch.float32", "fp32") else "tensor_core"


def configs_for(kernel: str, cc: int, dtype_cls: str = "tensor_core") -> tuple[TileConfig, ...]:
    """Autotune set of ``kernel`` for compute capability ``cc`` (``80``, ``86``, ``90``, or the major
    ``8``, ``9``): sm_90's set from Hopper on, sm_80's below."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if dtype_cls not in DTYPE_CLASSES:
        raise ValueError(f"dtype_cls must be one of {DTYPE_CLASSES}, got {dtype_cls!r}")
    table = _FP32 if dtype_cls == "fp32" else _TENSOR_CORE
    cc = cc * 10 if cc < 10 else cc
    return table[90 if cc >= 90 else 80][kernel]


_AUTOTUNED: dict[tuple[int, str, int, str], object] = {}


def launch(
    fn: Any,
    kernel: str,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    *args: Any,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    reset_to_zero: tuple[str, ...] = (),
    **kwargs: Any,
) -> None:
    """Launch the ``@triton.jit`` kernel ``fn`` with ``grid(meta)`` programs.

    Under the interpreter: one fixed ``INTERPRETER`` configuration. On a GPU: ``triton.autotune`` over
    ``configs_for(kernel, cc, dtype_class(dtype))``, keyed on ``V``, ``H`` and ``n_bucket`` (the
    power-of-two bucket of ``N``: tiles tuned at one N are not reused at a very different one);
    ``reset_to_zero`` names the buffers the kernel accumulates into (zeroed before every benchmark run).
    """
    from rpg_kernels.ops.dispatch import triton_interpreter_enabled

    if triton_interpreter_enabled() or device is None or device.type != "cuda":
        cfg = INTERPRETER
        fn[grid](*args, **kwargs, **cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    import torch
    import triton

    cc_major = torch.cuda.get_device_capability(device)[0]
    dtype_cls = dtype_class(dtype)
    cache_key = (id(fn), kernel, cc_major, dtype_cls)
    tuned = _AUTOTUNED.get(cache_key)
    if tuned is None:
        configs = [c.triton_config() for c in configs_for(kernel, cc_major, dtype_cls)]
        reset = list(reset_to_zero) or None
        tuned = triton.autotune(configs=configs, key=["V", "H", "n_bucket"], reset_to_zero=reset)(fn)
        _AUTOTUNED[cache_key] = tuned
    tuned[grid](*args, **kwargs)
