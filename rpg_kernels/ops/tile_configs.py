"""Tile shapes the Triton kernels may launch with, per GPU architecture.

Each kernel family has a small autotune set for ``sm_80`` (A100: ``mma.sync``) and ``sm_90``
(H100/H200: ``wgmma``, which needs ``BLOCK_N >= 64`` row tiles, ``num_warps`` a multiple of 4 and
fp16/bf16 operands). ``tests/ops/test_compile.py`` compiles every entry below for both architectures
(ahead of time, no GPU needed), checks that the sm_90 matmul loops use ``wgmma`` and that the
configurations do not spill registers. Keep these sets small: each entry costs autotuning time on
the first call with a new ``(V, H)`` and compile-test time here.

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

from dataclasses import dataclass


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

    def triton_config(self):
        import triton

        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Small tiles for the interpreter: fast enough in NumPy, and smaller than the test shapes.
INTERPRETER = TileConfig(block_n=32, block_v=64, block_h=32, num_warps=4, num_stages=1)

_SM80 = {
    "forward": (
        TileConfig(64, 128, 32, num_warps=4, num_stages=3),
        TileConfig(128, 128, 32, num_warps=8, num_stages=3),
        TileConfig(128, 64, 64, num_warps=4, num_stages=3),
    ),
    "backward_dh": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    ),
    "backward_dw": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    ),
    "backward_atomic": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    ),
}

_SM90 = {
    "forward": (
        TileConfig(64, 128, 64, num_warps=4, num_stages=3),
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(64, 256, 64, num_warps=8, num_stages=3),
    ),
    "backward_dh": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(64, 128, 64, num_warps=8, num_stages=3),
    ),
    "backward_dw": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    ),
    "backward_atomic": (
        TileConfig(64, 64, 64, num_warps=4, num_stages=3),
        TileConfig(128, 64, 64, num_warps=8, num_stages=3),
    ),
}

CONFIGS: dict[int, dict[str, tuple[TileConfig, ...]]] = {80: _SM80, 90: _SM90}
KERNELS = ("forward", "backward_dh", "backward_dw", "backward_atomic")


def configs_for(kernel: str, cc_major: int) -> tuple[TileConfig, ...]:
    """Autotune set of ``kernel`` for a GPU of compute capability major ``cc_major`` (>= 9 uses sm_90's)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return CONFIGS[90 if cc_major >= 9 else 80][kernel]


_AUTOTUNED: dict[tuple[int, str, int], object] = {}


def launch(fn, kernel: str, grid, *args, device=None, reset_to_zero: tuple[str, ...] = (), **kwargs) -> None:
    """Launch the ``@triton.jit`` kernel ``fn`` with ``grid(meta)`` programs.

    Under the interpreter: one fixed ``INTERPRETER`` configuration. On a GPU: ``triton.autotune`` over
    ``configs_for(kernel, cc)``, keyed on ``V`` and ``H``; ``reset_to_zero`` names the output buffers a
    kernel accumulates into (they are zeroed before every benchmark run).
    """
    from rpg_kernels.ops.dispatch import triton_interpreter_enabled

    if triton_interpreter_enabled() or device is None or device.type != "cuda":
        cfg = INTERPRETER
        fn[grid](*args, **kwargs, **cfg.meta(), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    import torch
    import triton

    cc_major = torch.cuda.get_device_capability(device)[0]
    cache_key = (id(fn), kernel, cc_major)
    tuned = _AUTOTUNED.get(cache_key)
    if tuned is None:
        configs = [c.triton_config() for c in configs_for(kernel, cc_major)]
        reset = list(reset_to_zero) or None
        tuned = triton.autotune(configs=configs, key=["V", "H"], reset_to_zero=reset)(fn)
        _AUTOTUNED[cache_key] = tuned
    tuned[grid](*args, **kwargs)
