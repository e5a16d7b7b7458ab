""".ci/gpu-check: its settings fit the lent machine's time, its bf16 selection selects the bf16 kernel
tests, and (slow) a CPU smoke run at tiny shapes goes through every step and leaves what the device tool
brings back (at most 8 files at the top of the output folder)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "gpu-check"
LENT_SECONDS = 300  # issue 12: the whole check within 5 minutes on an H100/H200
SUMMARY_SECONDS = 20  # the summary step's own limit, after the budget


def config(**env: str) -> dict[str, str]:
    text = subprocess.run(
        ["bash", str(SCRIPT), "--config"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in text.splitlines())


def test_the_budget_fits_five_minutes_and_the_issue_s_methods_run_ours_first():
    settings = config()
    assert int(settings["budget"]) + SUMMARY_SECONDS <= LENT_SECONDS
    assert settings["shape"] == "16384x4096x151936" and settings["dtype"] == "bf16"
    methods = settings["methods"].split()
    assert methods[:2] == ["ours", "matmul"]
    assert {"ours-fused", "liger-chunked", "liger-triton", "cce"} <= set(methods)
    assert config(GPU_CHECK_BUDGET="30")["budget"] == "30"


def test_the_bf16_selection_picks_the_bf16_cases_of_every_kernel_test_file():
    """Collected as on a GPU (fake_cuda): the filter must select bf16 cases, and only those."""
    settings = config()
    files = settings["kernel_tests"].split()
    assert all((ROOT / f).is_file() for f in files), files
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    cmd += [
        "-p",
        "tests.bench.fake_cuda",
        "-m",
        "not slow and not gpu",
        "-k",
        settings["bf16_filter"],
        *files,
    ]
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    selected = [line for line in out.stdout.splitlines() if "::" in line]
    assert out.returncode == 0 and len(selected) >= 20, out.stdout[-2000:] + out.stderr[-2000:]
    assert {line.split("::")[0] for line in selected} == set(files)
    for line in selected:
        assert "bfloat16" in line or "bf16" in line or "mixed_dtypes" in line, line


@pytest.mark.slow
def test_a_cpu_smoke_run_goes_through_every_step(tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "TRITON_INTERPRET": "1",
        "GPU_CHECK_SHAPE": "24x16x130",
        "GPU_CHECK_DTYPE": "fp32",
        "GPU_CHECK_REPEATS": "2",
        "GPU_CHECK_METHODS": "ours matmul ours-fused",
        "GPU_CHECK_KERNEL_TESTS": "tests/ops/test_linear_logprobs_forward.py",
        "GPU_CHECK_BF16_FILTER": "test_combine_partials",
        "GPU_CHECK_BUDGET": "240",
        "TMPDIR": str(tmp_path),
    }
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "gpu-check.log").read_text()[-3000:]

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        [
            "gpu-check.log",
            "loss-custom.png",
            "phases.json",
            "phases.md",
            "results.json",
            "results.md",
            "summary.md",
        ]
    )
    assert len(files) <= 8 and all(
        re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files
    )  # the device tool's limits
    assert not list(tmp_path.glob("gpu-check.*")), "the scratch folder is left behind"

    summary = (out / "summary.md").read_text()
    assert proc.stdout.rstrip().endswith(f"results in {out}") and summary.splitlines()[0] in proc.stdout
    steps = re.findall(r"^\| ([^|]+?) \| \d+ \| \d+ \| (\S+)", summary, flags=re.M)
    names = [name for name, _ in steps if name != "install carried wheels"]
    assert names == [
        "environment",
        "phases of one loss step",
        "realistic bf16 accuracy (single pass, fused)",
        "bf16 kernel tests on CUDA",
        "bench: loss at 24x16x130",
        "the other kernel tests on CUDA (time left)",
    ]
    assert all(code == "ok" for _, code in steps), steps
    assert "| bf16 kernel tests on CUDA |" in summary and "1 passed" in summary
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [
        ("ours", "ok"),
        ("matmul", "ok"),
        ("ours-fused", "skipped"),
    ]
    paths = json.loads((out / "phases.json").read_text())["paths"]
    assert [(p["path"], p["status"], p["consistent"]) for p in paths] == [
        ("single_pass", "ok", True),
        ("fused", "ok", True),
        ("fused_atomic", "ok", True),
    ]


def test_the_commit_comes_from_the_environment_where_there_is_no_git(monkeypatch):
    import bench.__main__ as cli

    def no_git(*args, **kwargs):
        raise OSError("no git here")

    monkeypatch.setattr(cli.subprocess, "run", no_git)
    monkeypatch.setenv("RPG_GIT_COMMIT", "abc1234")
    assert cli.git_commit() == "abc1234"
    monkeypatch.delenv("RPG_GIT_COMMIT")
    assert cli.git_commit() == "unknown"
