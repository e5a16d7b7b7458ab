"""Backend choice for the fused linear log-prob ops.

``"triton"``: the Triton kernels (``linear_logprobs_forward.py`` / ``linear_logprobs_backward.py``);
used for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1`` (the tests' interpreter mode).
``"torch"``: the chunked PyTorch path (``chunked.py``), the same math, for CPU tensors.
An explicit ``backend=`` overrides the automatic choice.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels through its NumPy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``; raises ``ValueError`` on unknown names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" or triton_interpreter_enabled() else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got tensors on {device}"
        )
    return backend
