"""Checkpoints survive SIGKILL, resume reproduces an uninterrupted run, a NaN loss stops cleanly.

The runs use the tiny generated model/task with the ``hf`` rollout engine (``transformers.generate`` with a
per-step seed: deterministic and cheap), so an uninterrupted run and a killed-then-resumed run can be
compared parameter for parameter.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpg_train import checkpoint
from rpg_train.config import build_config

ROOT = Path(__file__).resolve().parents[2]

OVERRIDES = [
    "rollout.backend=hf",
    "rollout.group_size=4",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "train.micro_batch_seqs=3",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.keep_checkpoints=5",
    "train.eval_every=0",
    "train.progress=false",
]

# Child process: a normal run, except that it SIGKILLs itself right after writing checkpoint KILL_AT
# ("after") or halfway through writing it, after the temp file and before the rename ("during").
CHILD = """
import os, signal, sys
from rpg_train import checkpoint
from rpg_train.config import build_config
from rpg_train.train import train

mode, kill_at, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
save, replace = checkpoint.save_checkpoint, os.replace

def save_then_die(out_dir, step, state, keep=2):
    path = save(out_dir, step, state, keep)
    if mode == "after" and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

def die_before_rename(src, dst):
    if mode == "during" and str(dst).endswith(f"step-{kill_at:08d}.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)

checkpoint.save_checkpoint = save_then_die
os.replace = die_before_rename
cfg = build_config("tiny", overrides=sys.argv[4:] + [f"train.out_dir={out}"])
train(cfg, resume=mode == "resume")
"""


def run_child(mode: str, kill_at: int, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(kill_at), str(out), *OVERRIDES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def final_params(out: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.latest_checkpoint(out)
    assert path is not None and path.name == "step-00000004.pt", path
    return checkpoint.load_checkpoint(path)["model"]


@pytest.mark.timeout(600)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    straight = run_child("none", -1, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    # killed right after checkpoint 2 is complete
    killed = run_child("after", 2, tmp_path / "killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "killed")] == ["step-00000002.pt"]
    # killed halfway through writing checkpoint 4: checkpoint 2 is still the latest and intact
    torn = run_child("during", 4, tmp_path / "killed")
    assert torn.returncode == -9, torn.stderr[-3000:]
    assert checkpoint.latest_checkpoint(tmp_path / "killed").name == "step-00000002.pt"
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "killed"))["step"] == 2

    resumed = run_child("resume", -1, tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    initial = checkpoint.load_checkpoint(tmp_path / "killed" / "checkpoints" / "step-00000002.pt")["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(initial[k], v) for k, v in expected.items()), "steps 3-4 changed nothing"
    steps = [
        json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


@pytest.mark.timeout(300)
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    import rpg_train.train as train_module

    real_loss, calls = train_module.policy_loss, {"n": 0}

    def nan_from_step_3(*args, **kwargs):
        # 2 prompts x 4 completions, mini-batch 2 prompts, micro-batch 8: call n is rollout step n
        loss, metrics = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] >= 3 else loss), metrics

    monkeypatch.setattr(train_module, "policy_loss", nan_from_step_3)
    cfg = build_config(
        "tiny",
        overrides=[
            *OVERRIDES,
            "train.prompts_per_step=2",
            "train.micro_batch_seqs=8",
            "train.checkpoint_every=1",
            f"train.out_dir={tmp_path}",
        ],
    )
    with pytest.raises(train_module.TrainingDiverged, match=r"step 3: non-finite loss.*step-00000002\.pt"):
        train_module.train(cfg)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001.pt", "step-00000002.pt"]
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
