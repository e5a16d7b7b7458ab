"""Atomic checkpoints and resume.

A checkpoint is one file ``<out>/checkpoints/step-XXXXXXXX.pt`` holding the model, optimizer and
scheduler states, the step, the reference-policy state and, for every rank, its RNG states and data
position. It is written to a temporary file in the same folder, flushed, fsync'ed and renamed, so a
crash (even SIGKILL) at any moment leaves either the old set of checkpoints or the new one, never a
torn file. Only rank 0 writes; all ranks read.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_NAME = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rank_states(rank_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``rank_state`` (a list indexed by rank; collective when distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [rank_state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rank_state)
    return states


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def save_checkpoint(out_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` (holding every rank's part) as checkpoint ``step``; keep the newest ``keep``."""
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    atomic_torch_save({**state, "step": step}, path)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files of an interrupted write are ignored)."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # our own files: RNG states (numpy arrays, python tuples) need the full unpickler
    return torch.load(path, map_location="cpu", weights_only=False)
