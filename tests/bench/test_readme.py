"""The README's benchmark block is generated from the committed results and kept current."""

import json

import pytest

from bench import readme

MIB = 2**20


def row(method, n, time_ms, peak_mib, status="ok", reason="", suite="loss"):
    ok = status == "ok"
    return {
        "suite": suite,
        "method": method,
        "shape": "tiny",
        "n": n,
        "h": 8,
        "v": 16,
        "status": status,
        "reason": reason,
        "note": "",
        "time_ms": time_ms if ok else None,
        "peak_mem_bytes": peak_mib * MIB if ok else None,
        "ratio_to_matmul": 1.5 if ok else None,
    }


def write_run(folder, device_name, date, rows):
    folder.mkdir(parents=True)
    meta = {
        "device_name": device_name,
        "dtype": "float32",
        "date": date,
        "command": f"python -m bench # {date}",
        "git_commit": "abc1234",
    }
    (folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def test_committed_readme_block_is_current():
    assert readme.main(["--check"]) == 0, "run `python -m bench.readme` and commit README.md"


def test_render_one_table_per_device_class_from_the_newest_run(tmp_path):
    results = tmp_path / "bench" / "results"
    write_run(results / "cpu-old", "CPU A", "2026-01-01T00:00:00", [row("naive", 64, 999.0, 1)])
    write_run(
        results / "cpu-new",
        "CPU B",
        "2026-02-01T00:00:00",
        [
            row("naive", 32, 111.0, 100),
            row("naive", 64, 200.0, 400),
            row("ours", 64, 300.0, 10),
            row("liger-triton", 64, 0, 0, status="skipped", reason="needs | CUDA"),
            # a method since dropped (committed runs keep their rows): rendered as it was recorded
            row("ours-chunked", 64, 0, 0, status="skipped", reason="on CPU `ours` is this chunked path"),
        ],
    )
    write_run(results / "gpu-x", "NVIDIA H200", "2026-01-15T00:00:00", [row("ours", 128, 5.0, 3)])
    (results / "demo-cpu").mkdir()  # bench.demo's results (another layout) are not benchmark runs
    (results / "demo-cpu" / "results.json").write_text(json.dumps({"meta": {"date": "2027"}, "runs": []}))
    text = readme.render(results, tmp_path)

    assert text.startswith(readme.START) and text.endswith(readme.END)
    assert text.index("### GPU") < text.index("### CPU")
    assert "999" not in text and "111" not in text  # older run, smaller N: links only
    assert "N=64, H=8, V=16 on CPU B" in text
    assert "| ours | 300.0 | 1.50 | 10 | 2.5 | ok |" in text
    assert "| liger-triton | — | — | — | — | skipped: needs / CUDA |" in text
    assert "| ours-chunked | — | — | — | — | skipped: on CPU `ours` is this chunked path |" in text
    assert "| ours | 5.0 | 1.50 | 3 | — | ok |" in text  # no naive row to compare with
    cpu = text[text.index("### CPU") :]
    assert cpu.index("cpu-new/results.md") < cpu.index("cpu-old/results.md")  # every run linked, newest first


def test_render_says_when_a_device_class_has_no_results(tmp_path):
    results = tmp_path / "bench" / "results"
    write_run(results / "cpu", "CPU A", "2026-01-01T00:00:00", [row("naive", 64, 10.0, 1)])
    assert "No GPU results committed yet." in readme.render(results, tmp_path)


def test_update_rewrites_only_the_block(tmp_path):
    results = tmp_path / "bench" / "results"
    write_run(results / "cpu", "CPU A", "2026-02-01T00:00:00", [row("naive", 64, 200.0, 400)])
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{readme.START}\nstale\n{readme.END}\noutro\n")
    assert readme.update(page, results)
    text = page.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "stale" not in text
    assert "| naive | 200.0 | 1.50 | 400 | 100.0 | ok |" in text
    assert not readme.update(page, results)

    page.write_text("no markers here\n")
    with pytest.raises(ValueError, match="bench:start"):
        readme.update(page, results)


def step(method, n, peak_mib, rate, status="ok", over=False):
    ok = status == "ok"
    return {
        "suite": "train-step",
        "method": method,
        "shape": "m",
        "n": n,
        "h": 8,
        "v": 16,
        "layers": 1,
        "status": status,
        "reason": "" if ok else "needs CUDA",
        "note": "",
        "peak_mem_bytes": peak_mib * MIB if ok else None,
        "within_budget": ok and not over,
        "over_limit": over,
        "tokens_per_s": rate if ok else None,
        "probe": "sweep",
    }


def fit(method, max_n, capped, status="ok"):
    return {
        "suite": "train-step-fit",
        "method": method,
        "shape": "m",
        "prompt": 128,
        "status": status,
        "reason": "" if status == "ok" else "needs CUDA",
        "note": "",
        "budget_bytes": 8 * 2**30,
        "max_n": max_n,
        "capped": capped,
        "peak_mem_bytes": None,
        "probes": [],
    }


def test_render_adds_the_newest_train_step_run_of_the_class(tmp_path):
    results = tmp_path / "bench" / "results"
    write_run(results / "cpu", "CPU A", "2026-02-01T00:00:00", [row("naive", 64, 200.0, 400)])
    rows = [
        step("ours", 1024, 100, 50.0),
        step("ours", 4096, 120, 40.0),
        step("trl", 1024, 1000, 20.0),
        step("trl", 4096, 4000, 10.0),
        step("transformers", 1024, 3000, 30.0),
        step("transformers", 4096, 9000, 1.0, over=True),
        step("trl-liger", 1024, 0, 0, status="skipped"),
        fit("ours", 4096, True),
        fit("trl", 4096, True),
        fit("transformers", 3072, False),
        fit("trl-liger", 0, False, status="skipped"),
        {"suite": "padding", "method": "fixed", "shape": "rpg", "rows": 64, "cap": 4096, "seeds": 3,
         "padding_fraction": 0.3},
        {"suite": "padding", "method": "token-budget", "shape": "rpg", "rows": 64, "cap": 4096, "seeds": 3,
         "padding_fraction": 0.05},
    ]  # fmt: skip
    write_run(results / "cpu-train-step", "CPU A", "2026-01-01T00:00:00", rows)
    text = readme.render(results, tmp_path)
    cpu = text[text.index("### CPU") :]
    assert cpu.index("Loss forward + backward") < cpu.index("Training step at long context")
    assert "| ours | ≥ 4096 (cap) | 100 | 120 | 50 | 40 | ok |" in cpu
    assert "| transformers | 3072 | 3000 | over budget | 30 | — | ok |" in cpu
    assert "| trl-liger | — | — | — | — | — | skipped: needs CUDA |" in cpu
    assert "3.0 % of trl at 4096 (120 vs 4000 MiB)" in cpu and "3.3 % of transformers at 1024" in cpu
    assert "fixed 30.0 %, token-budget 5.0 %" in cpu
    assert "cpu-train-step/results.md" in cpu
