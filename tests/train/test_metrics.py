"""`rpg_train.metrics`: metrics.jsonl, resume, plot and summary."""

import pytest
import torch

from rpg_train.metrics import MetricsLog, Reporter, plot_metrics, read_metrics, summarize
from tests.train.runs import tiny_config


def test_metrics_log_resume_plot_and_summary(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 11):
        log.log({"step": step, "reward": step / 10, "kl": torch.tensor(0.01 * step)})
    log.log({"step": 10, "eval_accuracy": 0.5})
    MetricsLog(tmp_path, resume_step=6)  # a resume from step 6 drops steps 7..10
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    summary = summarize([{"step": s, "reward": s / 10} for s in range(1, 21)])
    assert summary["reward_first"] == pytest.approx(0.15) and summary["reward_last"] == pytest.approx(1.95)
    assert plot_metrics(records, tmp_path / "m.png").stat().st_size > 1000


def test_a_torn_line_is_dropped_with_a_warning_and_the_file_rewritten_whole(tmp_path, capsys):
    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "reward": 0.1})
    with open(log.path, "a") as handle:
        handle.write('{"step": 4, "rew')  # a crash in the middle of the append
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert f"{log.path}: line 4 is not a JSON record" in capsys.readouterr().err
    MetricsLog(tmp_path, resume_step=3)
    assert log.path.read_text().splitlines()[-1] == '{"step": 3, "reward": 0.1}'
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.timeout(300)
def test_tensorboard_holds_the_logged_scalars_and_a_log_file_gets_a_line_per_step(tmp_path, capsys):
    # issue 16, finding 9: no TensorBoard / W&B, and a log file got one 13 KB "\r" line per 100 steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rpg_train.train import train

    train(tiny_config(tmp_path, "train.report_to=tensorboard", "train.progress=true", steps=2))
    records = read_metrics(tmp_path / "metrics.jsonl")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("reward", "kl", "loss", "grad_norm", "mismatch_kl", "rollout_outside_frac", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in records], key
    # pytest's captured stdout is not a terminal (nor is a log file): no bar, one line per step
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 1/2", "step 2/2"]
    assert all("reward " in line and "mismatch_kl " in line for line in lines)


def test_wandb_offline_writes_the_run_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    reporter = Reporter("wandb", tmp_path, config={"optim": {"lr": 1e-3}})
    reporter.log({"step": 1, "reward": 0.25, "mismatch_kl": 1e-6, "note": "text is not a scalar"})
    reporter.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    content = run_file.read_bytes()
    assert b"reward" in content and b"mismatch_kl" in content
    assert (tmp_path / "wandb-run-id").read_text() in run_file.name
