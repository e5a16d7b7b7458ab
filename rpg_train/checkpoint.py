"""Sharded, atomic checkpoints (``torch.distributed.checkpoint``) and what resume reads back.

One checkpoint is a folder ``<out>/checkpoints/step-XXXXXXXX/``:

    .metadata, __<r>_0.distcp   DCP: the policy's weights and AdamW states, each rank writing its own shards
                                (under DDP the replicated tensors are written once), and the frozen
                                reference's weights when there is one
    trainer.pt                  rank 0: the step, scheduler, reference counters, every rank's RNG states
                                and data position, and the run's facts (ranks, parallel mode, model folder)
    manifest.json               written last: the size of every file above

Writing (collective): every rank writes into ``.step-XXXXXXXX.tmp/`` (DCP fsyncs its files), rank 0 adds
``trainer.pt`` and the manifest, renames the folder (the commit) and prunes the older ones down to the
newest ``keep`` (renamed away before they are deleted). Pruning only looks at steps up to the one just
written: a checkpoint of a later step is not of this run's past (e.g. an unreadable one a resume fell back
from) and is left for the same step's save to replace. A crash at any moment, SIGKILL included, leaves
every committed checkpoint as it was, and `clean_temporaries` removes what it left half-written.
`list_checkpoints` is the one place that decides which folders are complete checkpoints (name, manifest,
every file's size), so a torn or truncated one is never picked; one whose files are all there but do not
read back (zeroed blocks after a crash, say) raises `UnreadableCheckpoint` naming it.

Reading: DCP loads a checkpoint written by any number of ranks, in either parallel mode, into this run's
layout (it reshards). What each rank needs beyond that (its RNG states and data position) is in
``trainer.pt``, indexed by rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

_NAME = re.compile(r"^step-(\d{8})$")
_TEMPORARY = re.compile(r"^\.step-\d{8}\.(tmp|deleting)$")
TRAINER_FILE, MANIFEST_FILE, DCP_METADATA = "trainer.pt", "manifest.json", ".metadata"


class UnreadableCheckpoint(RuntimeError):
    """A checkpoint whose files are all there but do not load (the message names it)."""


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def gather_rank_states(rank_state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``rank_state`` (a list indexed by rank; collective when distributed)."""
    if not _distributed():
        return [rank_state]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rank_state)
    return states


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns on every save/load without a process group that it assumes one process: we mean that."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Any) -> None:
    with open(path, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())


def _manifest(folder: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE
    }


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` is a committed checkpoint whose files are all there at their written sizes."""
    path = Path(path)
    if not (_NAME.match(path.name) and (path / MANIFEST_FILE).is_file()):
        return False
    try:
        expected = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(expected, dict) or not {TRAINER_FILE, DCP_METADATA} <= set(expected):
        return False
    return all(
        (path / name).is_file() and (path / name).stat().st_size == size for name, size in expected.items()
    )


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``out_dir``, oldest first (temporaries and torn ones left out)."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def step_of(path: str | Path) -> int:
    """The step of checkpoint folder ``path`` (``step-00000042`` -> 42)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-XXXXXXXX)")
    return int(match.group(1))


def step_folders(out_dir: str | Path) -> list[Path]:
    """Every ``step-XXXXXXXX`` folder under ``out_dir``, complete or not, oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=step_of)


def clean_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove what interrupted writes and deletions left (``.step-XXXXXXXX.tmp`` / ``.deleting``, up to a
    whole checkpoint each); returns the removed paths. Only the run that owns ``out_dir`` may call it."""
    folder = checkpoint_dir(out_dir)
    removed = [p for p in folder.iterdir() if _TEMPORARY.match(p.name)] if folder.is_dir() else []
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def _tensor_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, reference: nn.Module | None
) -> dict[str, Any]:
    """What DCP writes: the model's and optimizer's states keyed by parameter name (sharded under FSDP)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if reference is not None:
        state["reference"] = get_model_state_dict(reference)
    return state


def _remove(path: Path) -> None:
    """Delete a checkpoint folder: renamed away first, so no half-deleted folder keeps a checkpoint's name."""
    if not path.exists():
        return
    doomed = path.with_name(f".{path.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    reference: nn.Module | None = None,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``step`` (collective: every rank calls it) and keep the newest ``keep`` (0: all).

    ``trainer_state``: rank 0's small state (anything ``torch.save`` takes); ``rank_state``: this rank's
    (gathered into ``trainer.pt["ranks"]``); ``reference``: a frozen model to save beside the policy.
    """
    folder = checkpoint_dir(out_dir)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    ranks = gather_rank_states(rank_state)
    if _is_main():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a write of this step that was interrupted
    _barrier()
    with _one_process_is_meant():
        dcp.save(_tensor_state(model, optimizer, reference), checkpoint_id=tmp)
    if _is_main():
        trainer = {**trainer_state, "step": step, "ranks": ranks, "has_reference": reference is not None}
        _write_durably(tmp / TRAINER_FILE, lambda handle: torch.save(trainer, handle))
        manifest = json.dumps(_manifest(tmp), indent=1).encode()
        _write_durably(tmp / MANIFEST_FILE, lambda handle: handle.write(manifest))
        _fsync(tmp)
        _remove(final)  # a same-step folder that was not complete, or the step saved again
        os.replace(tmp, final)
        _fsync(folder)
        if keep > 0:  # this run's past only: a later step's folder is not one of its checkpoints
            for old in [p for p in list_checkpoints(out_dir) if step_of(p) <= step][:-keep]:
                _remove(old)
    _barrier()
    return final


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """``trainer.pt`` of checkpoint ``path`` (step, scheduler, ranks' states, run facts, config)."""
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    try:
        # our own file: RNG states (numpy arrays, python tuples) need the full unpickler
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UnreadableCheckpoint(f"{path / TRAINER_FILE}: does not load ({_short(err)})") from err


def _short(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def load_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Load checkpoint ``path`` into ``model``, ``optimizer`` (and ``reference``), resharding as needed
    (collective); returns its ``trainer.pt`` state."""
    trainer = read_trainer_state(path)
    if (reference is not None) != trainer.get("has_reference", False):
        saved = "a" if trainer.get("has_reference") else "no"
        wanted = "needs one" if reference is not None else "has none"
        raise ValueError(
            f"{path}: the checkpoint holds {saved} frozen reference model and this run {wanted}; "
            "resume with the algo.ref_update it was written with"
        )
    state = _tensor_state(model, optimizer, reference)
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=path)
    except (Exception, dcp.api.CheckpointException) as err:  # DCP's is a BaseException
        raise UnreadableCheckpoint(f"{path}: the weights do not load ({_short(err)})") from err
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    if reference is not None:
        set_model_state_dict(reference, state["reference"])
    return trainer


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Load only the policy's weights of checkpoint ``path`` into an unsharded ``model`` in this process
    (no process group needed: e.g. for the Hugging Face export)."""
    if not is_complete(path):
        raise FileNotFoundError(f"no complete checkpoint at {path}")
    state = {"model": model.state_dict()}
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
