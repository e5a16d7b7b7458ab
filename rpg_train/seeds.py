"""Every seed of a run, derived from ``train.seed`` by one function, and the RNG states a checkpoint keeps.

``derive_seed(seed, "rollout", step, rank)`` hashes its arguments (BLAKE2b, not Python's salted ``hash``),
so each purpose, step and rank gets its own stream, the same in every process and on every machine, and
nearby inputs give unrelated seeds.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def derive_seed(seed: int, purpose: str, *indices: int) -> int:
    """A seed in ``[0, 2**31)`` for ``purpose`` (e.g. "rollout") at ``indices`` (e.g. step, rank)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    key = "/".join(map(str, (seed, purpose, *indices))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % 2**31


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CUDA included)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's global generator states (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
