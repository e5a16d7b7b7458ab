"""`rpg_train.metrics`: metrics.jsonl, resume, plot and summary."""

import pytest
import torch

from rpg_train.metrics import MetricsLog, plot_metrics, read_metrics, summarize


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
