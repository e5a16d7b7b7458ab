"""The benchmark harness itself: flop counts, shape parsing, the N search, error/skip reporting,
the fresh-subprocess memory measurement and the output files. Tiny shapes only."""

import json
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.measure import CaseResult, CaseSpec, run_case, run_case_isolated
from bench.methods import Skip
from bench.shapes import Shape, parse_shapes, preset_shape
from bench.suites import SUITES, add_matmul_ratios, find_max_tokens, flop_count

PLUGINS = Path(__file__).with_name("plugin_methods.py")


def plugin(name: str) -> str:
    return f"{PLUGINS}:{name}"


def test_flop_counts():
    shape = Shape("custom", 3, 5, 7)
    assert flop_count(SUITES["loss"], "ours", shape) == (8 * 105, "8·N·H·V")
    assert flop_count(SUITES["loss"], "matmul", shape) == (6 * 105, "6·N·H·V")
    assert flop_count(SUITES["logprobs"], "naive", shape) == (2 * 105, "2·N·H·V")
    assert flop_count(SUITES["logprobs"], "matmul", shape) == (2 * 105, "2·N·H·V")
    assert flop_count(SUITES["matmul"], "matmul", shape) == (6 * 105, "6·N·H·V")


def test_parse_shapes_and_layout():
    shapes = parse_shapes(["tiny:1k,3000", "qwen3-4b", "100x8x16"], default_tokens=(64, 128))
    assert [(s.name, s.n, s.h, s.v) for s in shapes] == [
        ("tiny", 1024, 512, 32768),
        ("tiny", 3000, 512, 32768),
        ("qwen3-4b", 64, 2560, 151936),
        ("qwen3-4b", 128, 2560, 151936),
        ("custom", 100, 8, 16),
    ]
    assert preset_shape("tiny", 8192).layout() == (8, 1024)
    assert preset_shape("tiny", 3000).layout() == (1, 3000)
    with pytest.raises(ValueError, match="unknown shape preset"):
        parse_shapes(["nope:1"], (1,))
    with pytest.raises(ValueError, match="positive"):
        parse_shapes(["tiny:0"], (1,))


def test_matmul_ratio():
    rows = [
        {
            "suite": "loss",
            "shape": "s",
            "n": 4,
            "method": m,
            "status": "ok",
            "time_ms": t,
            "ratio_to_matmul": None,
        }
        for m, t in (("matmul", 2.0), ("ours", 3.0))
    ]
    add_matmul_ratios(rows)
    assert [r["ratio_to_matmul"] for r in rows] == [1.0, 1.5]


def affine_probe(fixed: int, per_token: int, calls: list[int]):
    def probe(n: int) -> CaseResult:
        calls.append(n)
        return CaseResult("ok", times_ms=[1.0], peak_mem_bytes=fixed + per_token * n)

    return probe


@pytest.mark.parametrize("per_token", [1000, 3000, 7000])
def test_find_max_tokens_brackets_the_true_limit(per_token):
    budget, calls = 10_000_000, []
    search = find_max_tokens(affine_probe(500_000, per_token, calls), budget, n_min=1024, n_max=2**20)
    true_max = (budget - 500_000) // per_token
    assert search.status == "ok" and not search.capped
    assert search.max_n <= true_max < search.max_n + max(1024, search.max_n // 8) + 1
    assert search.peak_at_max == 500_000 + per_token * search.max_n
    assert len(calls) < 15


def test_find_max_tokens_by_another_factor_probes_its_sweep_then_bisects():
    calls = []
    search = find_max_tokens(affine_probe(0, 1000, calls), 10_000_000, 1024, 65536, granule=512, factor=4)
    assert calls[:3] == [1024, 4096, 16384] and search.max_n <= 10_000 < search.max_n + 1250


def test_find_max_tokens_cap_and_nothing_fits():
    capped = find_max_tokens(affine_probe(0, 1, []), 10**12, n_min=1024, n_max=5000)
    assert capped.capped and capped.max_n == 5000
    none = find_max_tokens(affine_probe(10**9, 1, []), 10, n_min=1024, n_max=5000)
    assert none.max_n == 0 and not none.capped and none.status == "ok"


def test_find_max_tokens_stops_on_errors_and_skips():
    results = iter(
        [
            CaseResult("ok", times_ms=[1.0], peak_mem_bytes=1),
            CaseResult("error", reason="RuntimeError: compile failed"),
        ]
    )
    search = find_max_tokens(lambda n: next(results), 10**9, n_min=1024, n_max=2**20)
    assert (search.status, search.reason, search.max_n) == ("error", "RuntimeError: compile failed", 1024)
    skipped = find_max_tokens(lambda n: CaseResult("skipped", reason="needs CUDA"), 10**9, 1024, 2**20)
    assert (skipped.status, skipped.reason) == ("skipped", "needs CUDA")
    over = iter(
        [
            CaseResult("ok", times_ms=[1.0], peak_mem_bytes=1),
            CaseResult("error", reason="over memory limit", over_limit=True),
        ]
    )
    assert find_max_tokens(lambda n: next(over), 10**9, n_min=1024, n_max=2048).max_n == 1024


def micro_spec(method: str, **kw) -> CaseSpec:
    return CaseSpec(method, "loss", preset_shape("micro", 64), "float32", "cpu", **kw)


def test_run_case_reports_errors_and_skips_in_process():
    error = run_case(micro_spec(plugin("boom")))
    assert error.status == "error" and "RuntimeError: deliberate failure in setup" in error.reason

    def skip(task, problem):
        raise Skip("no such device")

    skipped = run_case(micro_spec("custom"), method=skip)
    assert (skipped.status, skipped.reason) == ("skipped", "no such device")
    ok = run_case(micro_spec("naive", warmup=0, repeats=3))
    assert ok.status == "ok", ok.reason
    assert len(ok.times_ms) == 3 and all(t > 0 for t in ok.times_ms) and ok.peak_mem_bytes >= 0
    on_cpu = run_case(micro_spec("ours-fused"))
    assert on_cpu.status == "skipped" and "need CUDA" in on_cpu.reason


def test_fresh_subprocess_memory_detects_a_big_allocation_and_a_crash():
    big_bytes = 256 * 2**20  # plugin_methods.BIG_BYTES
    idle = run_case_isolated(micro_spec(plugin("idle")), timeout_s=120)
    big = run_case_isolated(micro_spec(plugin("big_alloc")), timeout_s=120)
    assert idle.status == "ok" and big.status == "ok", (idle.reason, big.reason)
    assert 0 <= idle.peak_mem_bytes < 32 * 2**20
    assert 0.9 * big_bytes <= big.peak_mem_bytes < 1.5 * big_bytes
    limited = run_case_isolated(micro_spec(plugin("big_alloc"), mem_limit_bytes=64 * 2**20), timeout_s=120)
    assert limited.status == "error" and limited.over_limit and "over memory limit" in limited.reason
    crashed = run_case_isolated(micro_spec(plugin("crash")), timeout_s=120)
    assert crashed.status == "error" and "exited with 7" in crashed.reason


def test_gradients_count_in_the_peak_although_the_warm_up_left_some():
    """After the warm-up the inputs hold gradients; the measured steps replace them. Those must count."""
    spec = CaseSpec(plugin("regrad"), "loss", Shape("custom", 64, 1024, 4096), "float32", "cpu", warmup=1)
    result = run_case_isolated(spec, timeout_s=120)
    grad_bytes = 4096 * 1024 * 4
    assert result.status == "ok", result.reason
    assert 0.9 * grad_bytes <= result.peak_mem_bytes < 1.5 * grad_bytes


def test_cli_writes_json_markdown_and_plots_and_survives_failures(tmp_path):
    main(
        [
            "--suite",
            "loss",
            "--shapes",
            "micro:64,128",
            "--methods",
            "naive",
            "matmul",
            plugin("boom"),
            plugin("skipper"),
            "--repeats",
            "2",
            "--warmup",
            "0",
            "--in-process",
            "--out",
            str(tmp_path),
        ]
    )
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["device"] == "cpu" and "torch" in data["meta"]["versions"]
    rows = {(r["method"].rsplit(":", 1)[-1], r["n"]): r for r in data["rows"]}
    assert len(rows) == 8
    assert rows[("boom", 64)]["status"] == "error" and "deliberate failure" in rows[("boom", 64)]["reason"]
    assert (rows[("skipper", 128)]["status"], rows[("skipper", 128)]["reason"]) == (
        "skipped",
        "deliberately skipped",
    )
    naive = rows[("naive", 128)]
    assert naive["status"] == "ok" and naive["time_ms"] > 0 and naive["flops"] == 8 * 128 * 32 * 256
    assert naive["ratio_to_matmul"] == pytest.approx(naive["time_ms"] / rows[("matmul", 128)]["time_ms"])
    markdown = (tmp_path / "results.md").read_text()
    assert "deliberate failure" in markdown and "| naive | micro | 128 |" in markdown
    png = tmp_path / "loss-micro.png"
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_long_context_search_in_process(tmp_path):
    main(
        [
            "--suite",
            "long-context",
            "--shapes",
            "micro:64",
            "--methods",
            "naive",
            plugin("skipper"),
            "--budget-gib",
            "0.05",
            "--max-tokens",
            "256",
            "--in-process",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    naive, skipped = rows
    assert naive["status"] == "ok" and naive["capped"] and naive["max_n"] == 256
    assert [p["n"] for p in naive["probes"]] == [64, 128, 256]
    assert skipped["status"] == "skipped" and skipped["reason"] == "deliberately skipped"
    assert "≥ 256 (cap)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "long-context.png").exists()


def test_an_interrupted_run_keeps_its_tables_and_runs_without_tqdm(tmp_path, monkeypatch, capsys):
    import bench.__main__ as cli

    monkeypatch.setattr(cli, "progress_bar", None)  # a machine without tqdm: one line per case
    methods = ["naive", plugin("interrupt"), "matmul", "ours"]
    argv = ["--suite", "loss", "--shapes", "micro:64", "--methods", *methods]
    argv += ["--repeats", "1", "--warmup", "0", "--in-process", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    assert "bench [1/4] loss ours N=64\nbench [2/4] loss matmul N=64\n" in capsys.readouterr().err
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["ours", "matmul", "naive"]  # ours and matmul first
    markdown = (tmp_path / "results.md").read_text()
    assert "| naive | micro | 64 |" in markdown and "| ours | micro | 64 |" in markdown


def test_report_redraws_tables_and_plots_from_results_json(tmp_path):
    from bench import report

    argv = ["--suite", "loss", "--shapes", "micro:64,128", "--methods", "naive", "matmul"]
    main([*argv, "--repeats", "1", "--warmup", "0", "--in-process", "--out", str(tmp_path)])
    (tmp_path / "results.md").unlink()
    (tmp_path / "loss-micro.png").unlink()
    report.main([str(tmp_path)])
    assert "| naive | micro | 128 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "loss-micro.png").read_bytes()[:4] == b"\x89PNG"
