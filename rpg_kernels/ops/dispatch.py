"""Backend and method choice for the fused LM head (`rpg_kernels.config.BACKENDS`, `METHODS`).

``backend="auto"`` is ``"triton"`` for CUDA tensors and ``"torch"`` (the chunked PyTorch path) for the
rest. ``backend="triton"`` on CPU tensors runs the kernels through Triton's interpreter, which must be
enabled before Triton is imported (``TRITON_INTERPRET=1``; the tests do it). ``method`` applies to the
Triton backend: ``"auto"`` is the single pass.
"""

from __future__ import annotations

import os

import torch

from rpg_kernels.config import BACKENDS, METHODS


def triton_interpreter_enabled() -> bool:
    """True when Triton runs kernels through its NumPy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device``; raises ``ValueError`` naming ``backend``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreter_enabled():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got tensors on {device}"
        )
    return backend


def resolve_method(method: str, backend: str) -> str:
    """``"single_pass"`` or ``"fused"`` on the Triton backend (``"single_pass"`` for ``"auto"``)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if backend == "torch":
        if method == "fused":
            raise ValueError("method='fused' is a Triton path; backend='torch' has the chunked one only")
        return "single_pass"
    return "single_pass" if method == "auto" else method
