"""Small in-process runs of the tiny task for the trainer's tests: the ``hf`` engine (deterministic, cheap),
4 prompts x 4 completions a step, no evaluation, no bar."""

from __future__ import annotations

from pathlib import Path

from rpg_train.config import Config, build_config

FAST = [
    "rollout.backend=hf",
    "rollout.group_size=4",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "train.micro_batch_seqs=8",
    "train.eval_every=0",
    "train.progress=false",
    "train.export=false",
]


def tiny_config(out: Path, *overrides: str, steps: int = 2) -> Config:
    return build_config("tiny", overrides=[*FAST, f"train.steps={steps}", f"train.out_dir={out}", *overrides])
