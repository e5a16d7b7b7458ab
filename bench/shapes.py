"""Problem sizes: LM-head presets, token counts, dtypes per device.

A shape is ``N`` tokens of hidden size ``H`` scored against a vocabulary of ``V``: hidden ``[N, H]``,
LM-head weight ``[V, H]``. Tokens are laid out as ``B`` sequences of ``T`` tokens (``N = B * T``)
because the GRPO-style losses (ours, Liger) take per-sequence advantages ``[B]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# (hidden size H, vocabulary V) of the LM heads we care about
PRESETS: dict[str, tuple[int, int]] = {
    "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256),
    "qwen3-4b": (2560, 151936),
    "tiny": (512, 32768),  # the CPU target shape (with N = 8192)
    "tiny-lc": (128, 32768),  # CPU long-context probes: logits memory as "tiny", 4x cheaper steps
    "micro": (32, 256),  # for the harness's own tests
}
GPU_PRESETS = ("qwen2.5-7b", "llama-3-8b", "qwen3-4b")
GPU_TOKENS = (1024, 4096, 16384, 65536)
CPU_TOKENS = (1024, 2048, 4096, 8192)
CPU_TARGET = ("tiny", 8192)  # N=8192, H=512, V=32768, fp32: the CPU acceptance shape
MAX_SEQ_LEN = 1024


@dataclass(frozen=True)
class Shape:
    """One problem size. ``name`` is the preset (or ``custom``)."""

    name: str
    n: int
    h: int
    v: int

    @property
    def label(self) -> str:
        return f"{self.name} N={self.n} H={self.h} V={self.v}"

    def layout(self) -> tuple[int, int]:
        """``(B, T)`` with ``B * T == N``: sequences of up to ``MAX_SEQ_LEN`` tokens."""
        seq_len = MAX_SEQ_LEN if self.n % MAX_SEQ_LEN == 0 else self.n
        return self.n // seq_len, seq_len

    def with_n(self, n: int) -> Shape:
        return Shape(self.name, n, self.h, self.v)


def preset_shape(name: str, n: int) -> Shape:
    if name not in PRESETS:
        raise ValueError(f"unknown shape preset {name!r}; known: {', '.join(PRESETS)}")
    h, v = PRESETS[name]
    return Shape(name, n, h, v)


def parse_shapes(specs: list[str], default_tokens: tuple[int, ...]) -> list[Shape]:
    """Parse ``--shapes`` items: ``PRESET`` (every default N), ``PRESET:N[,N...]`` or ``NxHxV``.

    N may use a ``k`` suffix (``16k`` = 16384).
    """
    shapes: list[Shape] = []
    for spec in specs:
        spec = spec.strip().lower()
        custom = re.fullmatch(r"(\d+k?)x(\d+)x(\d+)", spec)
        if custom:
            shapes.append(
                Shape("custom", _tokens(custom.group(1)), int(custom.group(2)), int(custom.group(3)))
            )
            continue
        name, _, tokens = spec.partition(":")
        counts = [_tokens(t) for t in tokens.split(",")] if tokens else list(default_tokens)
        shapes.extend(preset_shape(name, n) for n in counts)
    return shapes


def _tokens(text: str) -> int:
    text = text.strip()
    n = int(text[:-1]) * 1024 if text.endswith("k") else int(text)
    if n <= 0:
        raise ValueError(f"--shapes: token count must be positive, got {text!r}")
    return n


def default_dtype(device: str) -> str:
    """bf16 on GPU (what training uses), fp32 on CPU (CPU bf16 matmuls are not representative)."""
    return "bfloat16" if device == "cuda" else "float32"
