"""``python -m bench.phases`` at a tiny shape on CPU (the Triton kernels through the interpreter that
tests/conftest.py enables): every phase timed, the chunk plan the library's, the replay's gradients
equal to the public call's, the files written; without Triton the paths are skipped with the reason."""

import json
import math
import time

import pytest
import torch

from bench import phases
from rpg_kernels.ops.dispatch import triton_interpreter_enabled
from rpg_kernels.ops.single_pass import chunk_rows

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()), reason="needs CUDA or the interpreter"
)
N, H, V = 24, 16, 130
WORKSPACE = 10 * V * 4  # 10 fp32 rows per chunk


def test_laps_attribute_each_interval_to_its_phase():
    laps = phases.Laps(torch.device("cpu"))
    laps.start()
    time.sleep(0.03)
    laps.lap("a")
    time.sleep(0.01)
    laps.lap("b")
    laps.lap("a")
    ms, calls = laps.totals()
    assert calls == {"a": 2, "b": 1}
    assert 30 <= ms["a"] < 60 and 10 <= ms["b"] < 30


@needs_triton
def test_every_phase_of_every_path_is_timed_and_the_replay_matches_the_public_call(tmp_path):
    argv = ["--shape", f"{N}x{H}x{V}", "--dtype", "fp32", "--device", "cpu", "--repeats", "1"]
    argv += ["--workspace-bytes", str(WORKSPACE), "--bias", "--out", str(tmp_path)]
    phases.main(argv)
    data = json.loads((tmp_path / "phases.json").read_text())
    paths = {p["path"]: p for p in data["paths"]}
    assert list(paths) == ["single_pass", "fused", "fused_atomic"]
    assert all(p["status"] == "ok" for p in paths.values()), [p.get("reason") for p in paths.values()]
    names = {name: [ph["phase"] for ph in p["phases"]] for name, p in paths.items()}
    assert names["single_pass"] == [
        "prepare",
        "logits_gemm",
        "row_kernel",
        "dh_gemm",
        "dw_gemm",
        "db",
        "finish",
    ]
    assert names["fused"] == ["prepare", "forward", "epilogue", "backward_dh", "backward_dw", "finish"]
    assert names["fused_atomic"] == ["prepare", "forward", "epilogue", "backward_atomic", "finish"]

    single = paths["single_pass"]
    kept = data["meta"]["kept_rows"]
    assert single["rows_run"] == kept and 0 < kept < N
    assert single["chunk_rows"] == chunk_rows(kept, V, torch.float32, WORKSPACE) == 10
    assert single["chunks"] == math.ceil(kept / 10) >= 2
    for p in paths.values():
        calls = {ph["phase"]: ph["calls"] for ph in p["phases"]}
        per_chunk = ("logits_gemm", "row_kernel", "dh_gemm", "dw_gemm", "db")
        expected = {ph: single["chunks"] if ph in per_chunk and p is single else 1 for ph in calls}
        assert calls == expected
        assert all(ph["time_ms"] > 0 for ph in p["phases"]) and p["end_to_end_ms"] > 0
        assert p["sum_ms"] == pytest.approx(sum(ph["time_ms"] for ph in p["phases"]))  # one repeat
        assert p["grad_rel_diff"] < 1e-5 and p["consistent"], p["grad_rel_diff"]
    gemm = next(ph for ph in single["phases"] if ph["phase"] == "dw_gemm")
    assert gemm["flops"] == 2 * kept * H * V
    assert data["matmul"]["time_ms"] > 0

    markdown = (tmp_path / "phases.md").read_text()
    assert "## `single_pass`" in markdown and "| row_kernel |" in markdown
    assert "| backward_atomic |" in markdown
    assert "(consistent)" in markdown and "INCONSISTENT" not in markdown
    assert (tmp_path / "phases.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "phases.md").unlink()
    phases.main(["--render", str(tmp_path), "--no-plot"])
    assert (tmp_path / "phases.md").read_text() == markdown


def test_without_triton_the_paths_are_skipped_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = ["--shape", "16x8x32", "--device", "cpu", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]
    data = phases.run(phases.parse_args(argv))
    assert [(p["path"], p["status"]) for p in data["paths"]] == [
        ("single_pass", "skipped"),
        ("fused", "skipped"),
        ("fused_atomic", "skipped"),
    ]
    assert all("TRITON_INTERPRET=1" in p["reason"] for p in data["paths"])
    assert data["matmul"]["time_ms"] > 0 and not (tmp_path / "phases.png").exists()
    assert "skipped: the Triton kernels need CUDA" in (tmp_path / "phases.md").read_text()


def test_a_failing_path_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    def flaky(path, *args):
        if path.name == "fused":
            raise RuntimeError("deliberate failure")
        return {"path": path.name, "title": path.title, "status": "skipped", "reason": "not this test's"}

    monkeypatch.setattr(phases, "triton_available", lambda device: "")
    monkeypatch.setattr(phases, "measure_path", flaky)
    argv = ["--shape", "16x8x32", "--device", "cpu", "--repeats", "1", "--no-plot", "--out", str(tmp_path)]
    data = phases.run(phases.parse_args(argv))
    assert [(p["path"], p["status"]) for p in data["paths"]] == [
        ("single_pass", "skipped"),
        ("fused", "error"),
        ("fused_atomic", "skipped"),
    ]
    assert data["paths"][1]["reason"].startswith("RuntimeError: deliberate failure (at test_phases.py:")
    assert "error: RuntimeError: deliberate failure" in (tmp_path / "phases.md").read_text()
