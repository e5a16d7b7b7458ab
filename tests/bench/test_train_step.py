"""The train-step suite on a micro model: every method runs (or says why not), the search and its rows, the
micro-batchings side by side, the tables, plot and README lines drawn from the results; the padding target."""

import json

import pytest

from bench import readme, train_step
from bench.__main__ import main
from bench.measure import CaseSpec, run_case_isolated
from bench.train_step import model_shape, padding_rows


def test_token_budgets_pad_at_most_a_tenth_of_the_rpg_presets_mini_batch():
    """The issue's target, on the rpg preset's own budget and mini-batch (no model runs)."""
    rows = {r["method"]: r for r in padding_rows()}
    print({name: round(r["padding_fraction"], 4) for name, r in rows.items()})
    assert rows["token-budget"]["padding_fraction"] <= 0.10
    assert rows["fixed"]["padding_fraction"] > 0.25  # what fixed micro-batches of 4 sequences waste
    assert rows["packed"]["padding_fraction"] == 0.0
    assert (
        rows["packed"]["micro_batches"]
        <= rows["token-budget"]["micro_batches"]
        < rows["fixed"]["micro_batches"]
    )


@pytest.mark.timeout(600)
def test_train_step_suite_runs_every_method_and_writes_its_tables(tmp_path):
    methods = [*train_step.TRAIN_STEP_METHODS, *train_step.BATCHING_METHODS]
    argv = ["--suite", "train-step", "--shapes", "qwen2-micro:32,64", "--methods", *methods]
    main([*argv, "--repeats", "1", "--in-process", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    rows = data["rows"]
    steps = [r for r in rows if r["suite"] == "train-step"]
    by = {(r["method"], r["n"]): r for r in steps}
    for method in ("ours", "trl", "transformers"):
        for n in (32, 64):
            row = by[method, n]
            assert row["status"] == "ok", row["reason"]
            assert row["tokens"] == train_step.PROMPT_TOKENS + n and row["tokens_per_s"] > 0
            assert row["peak_mem_bytes"] is not None and row["within_budget"]
    assert by["trl-liger", 32]["status"] == "skipped" and "CUDA" in by["trl-liger", 32]["reason"]
    fits = {r["method"]: r for r in rows if r["suite"] == "train-step-fit"}
    assert fits["ours"]["capped"] and fits["ours"]["max_n"] == 64
    assert fits["trl-liger"]["status"] == "skipped"
    spread = {r["method"]: r for r in rows if r["suite"] == "micro-batching"}
    assert all(r["status"] == "ok" for r in spread.values()), spread
    assert spread["packed"]["padding_fraction"] == 0.0
    assert spread["token-budget"]["padding_fraction"] < spread["fixed"]["padding_fraction"]
    assert spread["token-budget"]["micro_batches"] < spread["fixed"]["micro_batches"]
    assert len({r["tokens"] for r in spread.values()}) == 1  # the same batch for all three
    markdown = (tmp_path / "results.md").read_text()
    for title in ("## train-step", "## train-step-fit", "## micro-batching", "## padding"):
        assert title in markdown
    assert (tmp_path / "train-step-qwen2-micro.png").read_bytes()[:4] == b"\x89PNG"
    section = "\n".join(readme.train_step_section(data))
    assert "| ours | ≥ 64 (cap) |" in section and "peak MiB at 32" in section
    assert "fixed" in section and "token-budget" in section  # (in-process peaks: no shares asserted)


def test_a_train_step_case_in_its_own_process_reports_its_tokens():
    spec = CaseSpec(
        "ours", "train-step", model_shape("qwen2-micro", 16), "float32", "cpu", warmup=0, repeats=1
    )
    result = run_case_isolated(spec, timeout_s=300)
    assert result.status == "ok", result.reason
    assert result.extra["tokens"] == train_step.PROMPT_TOKENS + 16 and result.extra["micro_batches"] == 1
    assert result.peak_mem_bytes > 0


def test_unknown_models_and_tasks_are_refused():
    with pytest.raises(ValueError, match="unknown train-step model"):
        model_shape("gpt-9", 1)
    with pytest.raises(ValueError, match="task"):
        train_step.make_problem(model_shape("qwen2-micro", 4), "float32", "cpu", "loss")
