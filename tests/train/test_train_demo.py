"""The tiny demo end to end with real vLLM (CPU) rollouts, and (slow) its reward criterion on three seeds."""

import os

import pytest
import torch

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from bench.demo import run_seed  # noqa: E402
from rpg_train import checkpoint  # noqa: E402
from rpg_train.config import build_config  # noqa: E402
from rpg_train.metrics import read_metrics  # noqa: E402

pytest.importorskip("vllm")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # fsdp in one process: a one-rank group, vLLM joins it
def test_tiny_demo_with_vllm_writes_metrics_checkpoint_plot(tmp_path, parallel):
    from rpg_train.train import train

    cfg = build_config(
        "tiny",
        overrides=[
            f"train.parallel={parallel}",
            "rollout.backend=vllm",
            "train.steps=3",
            "train.eval_every=3",
            "train.checkpoint_every=2",
            "train.progress=false",
            f"train.out_dir={tmp_path}",
        ],
    )
    summary = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        assert 0.0 <= record["reward"] <= 1.0 and 0.0 <= record["accuracy"] <= 1.0
        assert record["response_length"] >= 1 and record["tokens_per_s"] > 0
        for key in ("kl", "clip_frac", "entropy", "loss", "grad_norm"):
            assert isinstance(record[key], float), key
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    assert len(evals) == 2 and all(0.0 <= e <= 1.0 for e in evals)  # before training and at step 3
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    state = checkpoint.read_trainer_state(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and {"scheduler", "reference", "ranks", "model_dir"} <= set(state)
    assert (tmp_path / "metrics.png").stat().st_size > 1000
    assert (tmp_path / "config.yaml").is_file() and summary["steps"] == 3
    assert (tmp_path / "final" / "config.json").is_file() and summary["final"] == str(tmp_path / "final")
    assert state["parallel"] == parallel and not torch.distributed.is_initialized()  # groups torn down


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tiny_demo_reward_rises_by_0_3_within_15_minutes(tmp_path, seed):
    summary, wall = run_seed(seed, tmp_path / f"seed{seed}")
    print(f"seed {seed}: {summary} wall {wall:.0f}s")
    assert wall < 15 * 60
    assert summary["reward_last"] - summary["reward_first"] >= 0.3, summary
