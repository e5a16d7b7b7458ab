"""The run folder (``train.out_dir``): one run's files, never two runs' mixed.

A run owns its folder: ``checkpoints/``, ``metrics.jsonl``, ``summary.json``, ``metrics.png``, ``final/``,
``tensorboard/``, ``wandb/`` and ``config.yaml`` (``tiny/``, the generated tiny task, is rebuilt by every
run). A new run into a folder that holds checkpoints is refused (its rotation, summary and a later
``--resume`` would mix the two runs): ``--resume`` continues the run that is there, ``--out`` puts the new
one elsewhere, ``--overwrite`` deletes the old run's files first. The owner then removes the partial
checkpoints an interrupted write left (`rpg_train.checkpoint.clean_temporaries`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from rpg_train import checkpoint
from rpg_train.config import ConfigError

RUN_FILES = ("metrics.jsonl", "summary.json", "metrics.png", "config.yaml", "wandb-run-id")
RUN_FOLDERS = ("checkpoints", "final", "tensorboard", "wandb")


class OutDirInUse(ConfigError):
    """A new run into a folder that holds another run's checkpoints."""


def check_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a new run (neither ``resume`` nor ``overwrite``) into a folder with checkpoints (any rank)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    found = checkpoint.step_folders(out_dir)
    if found and not resume and not overwrite:
        names = ", ".join(p.name for p in found[-3:])
        raise OutDirInUse(
            f"{out_dir} already holds another run's checkpoints ({names}); pass --resume to continue that "
            "run, --out DIR to start this one in another folder, or --overwrite to delete the old run's "
            "checkpoints and metrics first"
        )


def claim_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """Rank 0, after `check_out_dir`: delete the old run's files (``overwrite``) and the partial checkpoints
    of interrupted writes; returns what it did, as lines to print."""
    out_dir = Path(out_dir)
    notes = []
    if overwrite:
        gone = [out_dir / name for name in RUN_FILES + RUN_FOLDERS if (out_dir / name).exists()]
        for path in gone:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if gone:
            notes.append(f"--overwrite: deleted {', '.join(p.name for p in gone)} from {out_dir}")
    removed = checkpoint.clean_temporaries(out_dir)
    if removed:
        names = ", ".join(p.name for p in removed)
        notes.append(f"removed the partial checkpoint(s) of interrupted writes: {names}")
    return notes
