"""The demo tables in README.md and docs/TRAINING.md are generated from the committed demo results."""

import json

from bench import demo


def write_run(folder, date, gains):
    folder.mkdir(parents=True)
    runs = [
        {
            "seed": seed,
            "wall_s": 30.0 + seed,
            "steps": 100.0,
            "reward_first": 0.2,
            "reward_last": 0.2 + gain,
            "reward_gain": gain,
            "eval_accuracy_first": 0.0,
            "eval_accuracy_last": 0.5,
        }
        for seed, gain in enumerate(gains)
    ]
    meta = {"device_name": "CPU X", "date": date, "git_commit": "abc1234", "command": "python -m rpg_train"}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "runs": runs}))


def test_committed_demo_tables_are_current():
    assert demo.main(["--check"]) == 0, "run `python -m bench.demo --render` and commit the pages"


def test_render_takes_the_newest_run_and_links_from_the_page(tmp_path):
    results = tmp_path / "bench" / "results"
    write_run(results / "demo-old", "2026-01-01T00:00:00", [0.9])
    write_run(results / "demo-new", "2026-02-01T00:00:00", [0.61, 0.33])
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "TRAINING.md"
    text = demo.render(page, results)
    assert text.startswith(demo.START) and text.endswith(demo.END)
    assert "| 0 | 100 | 0.20 | 0.81 | +0.61 | 0.00 → 0.50 | 30 s |" in text
    assert "| 1 | 100 | 0.20 | 0.53 | +0.33 | 0.00 → 0.50 | 31 s |" in text
    assert "+0.90" not in text and "for S in 0, 1 on CPU X" in text
    assert "(../bench/results/demo-new/results.json)" in text
    assert "](../bench/results/demo-new/metrics-seed0.png)" in text
    top = demo.render(tmp_path / "README.md", results)
    assert "](bench/results/demo-new/metrics-seed0.png)" in top


def test_render_without_results(tmp_path):
    text = demo.render(tmp_path / "README.md", tmp_path)
    assert "No demo results yet" in text and text.endswith(demo.END)
