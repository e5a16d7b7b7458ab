"""Checkpoints survive SIGKILL, SIGINT/SIGTERM checkpoint and exit, resume reproduces an uninterrupted run bit
for bit (after a kill, a signal, a torn metrics line or an unreadable checkpoint), a NaN loss stops cleanly.

The runs use the tiny generated model/task with the ``hf`` rollout engine (``transformers.generate`` with a
per-step seed: deterministic and cheap), so an uninterrupted run and a killed-then-resumed one can be compared
parameter for parameter (their exported ``final/`` folders). One process under ddp; two (``torchrun``, gloo)
under fsdp, where one rank is killed in the middle of a step's backward and then in the middle of a
checkpoint write, and whose checkpoint then resumes in one process (resharded).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rpg_train import checkpoint
from rpg_train.config import build_config
from rpg_train.metrics import read_metrics

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

# A normal run (resumed when argv[1] is 1), except that one rank SIGKILLs itself: "after" right after
# checkpoint AT is committed, "during" halfway through writing it (DCP files written, before the commit
# rename), "step" in the middle of step AT (rank 1, after a micro-batch's backward); or signals itself once
# (as Ctrl-C or a scheduler would): "term-rollout" SIGTERM while step AT samples (before its update),
# "int-update" SIGINT after a micro-batch's backward of step AT.
CHILD = """
import os, signal, sys
from pathlib import Path
from rpg_train import checkpoint, train as train_module
from rpg_train.config import build_config
from rpg_train.interrupt import Interrupted
from rpg_train.metrics import read_metrics

resume, mode, at, out = sys.argv[1] == "1", sys.argv[2], int(sys.argv[3]), sys.argv[4]
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
save, replace = checkpoint.save_checkpoint, os.replace
step_fn, forward_backward = train_module.train_step, train_module.forward_backward_step
sample = train_module.collect_rollouts
current = {}

def signal_once(signum):
    if not current.get("signalled"):
        current["signalled"] = True
        os.kill(os.getpid(), signum)

def save_then_die(out_dir, step, **kwargs):
    path = save(out_dir, step, **kwargs)
    if mode == "after" and step == at:
        die()
    return path

def die_before_commit(src, dst):
    if mode == "during" and rank == 0 and Path(dst).name == f"step-{at:08d}":
        die()
    return replace(src, dst)

def train_step(cfg, info, policy, engine, task, step):
    current["step"] = step + 1
    return step_fn(cfg, info, policy, engine, task, step)

def forward_backward_step(*args, **kwargs):
    out = forward_backward(*args, **kwargs)
    if mode == "step" and current["step"] == at and rank == world - 1:
        die()
    if mode == "int-update" and current["step"] == at:
        signal_once(signal.SIGINT)
    return out

def collect_rollouts(*args, **kwargs):
    if mode == "term-rollout" and current["step"] == at:
        signal_once(signal.SIGTERM)
    return sample(*args, **kwargs)

checkpoint.save_checkpoint, os.replace = save_then_die, die_before_commit
train_module.train_step, train_module.forward_backward_step = train_step, forward_backward_step
train_module.collect_rollouts = collect_rollouts
cfg = build_config("tiny", overrides=sys.argv[5:] + [f"train.out_dir={out}"])
try:
    train_module.train(cfg, resume=resume)
except Interrupted as stopped:  # as python -m rpg_train does
    sys.exit(stopped.exit_code)
"""


def run_child(
    tmp_path: Path, mode: str, at: int, out: Path, *, resume: bool = False, ranks: int = 1, extra=()
) -> subprocess.CompletedProcess:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(
        [*launcher, str(script), "1" if resume else "0", mode, str(at), str(out), *OVERRIDES, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    assert checkpoint.latest_checkpoint(out).name == "step-00000004"
    return load_file(out / "final" / "model.safetensors")


def assert_same_run(straight: Path, resumed: Path) -> None:
    expected, got = final_weights(straight), final_weights(resumed)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name  # bit for bit
    initial = load_file(resumed / "tiny" / "model" / "model.safetensors")
    assert any(not torch.equal(initial[k], v) for k, v in expected.items() if k in initial), "nothing trained"
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted one-process run the interrupted ones are compared with."""
    tmp_path = tmp_path_factory.mktemp("straight")
    run = run_child(tmp_path, "none", -1, tmp_path / "straight")
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp_path / "straight"


@pytest.mark.timeout(600)
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, straight):
    # killed right after checkpoint 2 is complete
    killed = run_child(tmp_path, "after", 2, tmp_path / "killed")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "killed")] == ["step-00000002"]
    # killed halfway through writing checkpoint 4: checkpoint 2 is still the latest and intact
    torn = run_child(tmp_path, "during", 4, tmp_path / "killed", resume=True)
    assert torn.returncode == -9, torn.stderr[-3000:]
    assert (checkpoint.checkpoint_dir(tmp_path / "killed") / ".step-00000004.tmp" / ".metadata").is_file()
    assert checkpoint.latest_checkpoint(tmp_path / "killed").name == "step-00000002"
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path / "killed"))["step"] == 2

    resumed = run_child(tmp_path, "resume", -1, tmp_path / "killed", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ".step-00000004.tmp" in resumed.stdout  # the partial write, removed at start-up
    assert_same_run(straight, tmp_path / "killed")


@pytest.mark.timeout(600)
def test_sigterm_and_sigint_checkpoint_and_exit_then_resume_matches_uninterrupted(tmp_path, straight):
    # issue 16, finding 7: Ctrl-C printed a vLLM traceback and saved nothing (up to checkpoint_every - 1
    # steps lost). checkpoint_every is 2: the checkpoints below are written because of the signals.
    out = tmp_path / "signalled"
    # SIGTERM while step 2 samples: the policy is still step 1's, so the step is abandoned at once and
    # step 1 is checkpointed with the RNG states and data position step 2 started from
    term = run_child(tmp_path, "term-rollout", 2, out)
    assert term.returncode == 143, term.stderr[-3000:]
    assert "Traceback" not in term.stderr, term.stderr[-3000:]
    assert (
        f"SIGTERM: step 2 abandoned; stopped with checkpoint {checkpoint.checkpoint_dir(out)}" in term.stdout
    )
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000001"]
    # SIGINT in the middle of step 3's optimizer steps: the step is finished, then checkpointed
    interrupted = run_child(tmp_path, "int-update", 3, out, resume=True)
    assert interrupted.returncode == 130 and "Traceback" not in interrupted.stderr, interrupted.stderr[-3000:]
    assert "SIGINT: finishing this step" in interrupted.stderr
    assert "SIGINT: step 3 finished; stopped with checkpoint" in interrupted.stdout
    assert [p.name for p in checkpoint.list_checkpoints(out)][-1] == "step-00000003"

    resumed = run_child(tmp_path, "resume", -1, out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(straight, out)


@pytest.mark.timeout(900)
def test_fsdp_sigkill_in_a_step_and_in_a_checkpoint_write_then_resume(tmp_path):
    # with a frozen reference refreshed every 3 optimizer steps (2 per rollout step): it is checkpointed and
    # sharded too, and a refresh falls between the checkpoints
    reference = ["algo.ref_update=every_k", "algo.ref_update_k=3"]
    fsdp = ["train.parallel=fsdp", *reference]
    straight = run_child(tmp_path, "none", -1, tmp_path / "straight", ranks=2, extra=fsdp)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert {p.name for p in checkpoint.latest_checkpoint(tmp_path / "straight").iterdir()} >= {
        "__0_0.distcp",
        "__1_0.distcp",
    }  # each rank wrote its shards

    out = tmp_path / "killed"
    in_step = run_child(tmp_path, "step", 3, out, ranks=2, extra=fsdp)
    assert in_step.returncode != 0 and "Signal 9 (SIGKILL)" in in_step.stderr, in_step.stderr[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000002"]
    in_write = run_child(tmp_path, "during", 4, out, resume=True, ranks=2, extra=fsdp)
    assert in_write.returncode != 0 and "Signal 9 (SIGKILL)" in in_write.stderr, in_write.stderr[-3000:]
    assert (checkpoint.checkpoint_dir(out) / ".step-00000004.tmp").is_dir()
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step-00000002"]

    resumed = run_child(tmp_path, "resume", -1, out, resume=True, ranks=2, extra=fsdp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path / "straight", out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("ref_updates", 0) for r in records] == [0, 1, 2, 2]  # refreshed after optimizer steps 3, 6

    # the 2 ranks' sharded checkpoint resumes in one ddp process: DCP reshards it (announced), the run goes on
    more = run_child(
        tmp_path, "resume", -1, out, resume=True, extra=[*reference, "train.parallel=ddp", "train.steps=5"]
    )
    assert more.returncode == 0 and "written by 2 ranks, this run has 1" in more.stdout, more.stderr[-3000:]
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(out))["world_size"] == 1
    assert checkpoint.latest_checkpoint(out).name == "step-00000005"


@pytest.mark.timeout(300)
def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    import rpg_train.train as train_module

    real_step, calls = train_module.forward_backward_step, {"n": 0}

    def nan_from_step_3(*args, **kwargs):
        # 2 prompts x 4 completions, mini-batch 2 prompts, micro-batch 8: call n is rollout step n
        loss, metrics = real_step(*args, **kwargs)
        calls["n"] += 1
        return (loss * math.nan if calls["n"] >= 3 else loss), metrics

    monkeypatch.setattr(train_module, "forward_backward_step", nan_from_step_3)
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
    with pytest.raises(train_module.TrainingDiverged, match=r"step 3: non-finite loss.*step-00000002"):
        train_module.train(cfg)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000001", "step-00000002"]
    assert checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path))["step"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny" / "model")
    checkpoint.load_model_weights(checkpoint.latest_checkpoint(tmp_path), model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not (tmp_path / "final").exists()  # no export of a run that failed


@pytest.mark.timeout(300)
def test_resume_survives_a_torn_metrics_line_an_unreadable_checkpoint_and_partial_writes(tmp_path, capsys):
    # issue 16, finding 5 (and 6's --resume warning): each of these made --resume crash (a JSONDecodeError
    # naming no file, a torch zip error naming no file) or passed in silence
    from rpg_train.train import train
    from tests.train.runs import tiny_config

    keep = ["train.checkpoint_every=1", "train.keep_checkpoints=3"]
    train(tiny_config(tmp_path, *keep, steps=3))
    with open(tmp_path / "metrics.jsonl", "a") as handle:  # a crash in the middle of an append
        handle.write('{"step": 4, "rew')
    trainer = checkpoint.checkpoint_dir(tmp_path) / "step-00000003" / "trainer.pt"
    trainer.write_bytes(bytes(trainer.stat().st_size))  # all there, the right size, unreadable
    partial = checkpoint.checkpoint_dir(tmp_path) / ".step-00000004.tmp"  # a kill during a write
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"x" * 1000)
    capsys.readouterr()

    train(tiny_config(tmp_path, *keep, "optim.lr=1e-3", steps=4), resume=True)
    printed = capsys.readouterr()
    assert f"{tmp_path / 'metrics.jsonl'}: line 4 is not a JSON record" in printed.err
    assert f"{trainer}: does not load" in printed.err and "trying the previous one" in printed.err
    assert "optim.lr: 0.002 -> 0.001" in printed.err  # the config differs from the checkpoint's
    assert ".step-00000004.tmp" in printed.out and not partial.exists()
    records = read_metrics(tmp_path / "metrics.jsonl")  # resumed from step 2: steps 3 and 4 redone
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["step-00000002", "step-00000003", "step-00000004"]
    assert checkpoint.read_trainer_state(trainer.parent)["step"] == 3  # rewritten by the resumed run
