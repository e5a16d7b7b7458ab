"""bench.summary: issue 12's targets read from a run's own numbers, the steps and their JUnit counts."""

import json

from bench import summary
from rpg_kernels.ops.lm_head import DEFAULT_WORKSPACE_BYTES

MIB = 2**20
N, H, V = 16384, 4096, 151936
GRADS = (N + V) * H * 2


def row(method, time_ms, peak=None, status="ok", n=N, dtype="bfloat16"):
    return {
        "suite": "loss",
        "method": method,
        "shape": "custom",
        "n": n,
        "h": H,
        "v": V,
        "dtype": dtype,
        "device": "cuda",
        "status": status,
        "reason": "" if status == "ok" else "cut-cross-entropy not installed",
        "note": "",
        "time_ms": time_ms if status == "ok" else None,
        "time_min_ms": time_ms,
        "time_max_ms": time_ms,
        "peak_mem_bytes": peak if status == "ok" else None,
        "tflops": 1.0,
        "ratio_to_matmul": None,
    }


def write_results(folder, rows, device_name="NVIDIA H200"):
    meta = {"device_name": device_name, "date": "2026-12-02T10:00:00+00:00", "git_commit": "abc1234"}
    (folder / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))


def test_targets_met_and_not_met(tmp_path):
    limit = GRADS + DEFAULT_WORKSPACE_BYTES + 256 * MIB
    rows = [
        row("ours", 110.0, peak=limit),
        row("matmul", 100.0),
        row("liger-chunked", 300.0),
        row("cce", 0, status="skipped"),
    ]
    write_results(tmp_path, rows)
    verdicts = [
        v for _, _, v in summary.evaluate_targets(json.loads((tmp_path / "results.json").read_text()))
    ]
    assert verdicts == ["met", "met", "met"]

    rows = [row("ours", 130.0, peak=limit + 1), row("matmul", 100.0), row("liger-chunked", 300.0)]
    found = summary.evaluate_targets({"meta": {"device_name": "NVIDIA H200"}, "rows": rows})
    assert [v for _, _, v in found] == ["NOT MET", "NOT MET", "NOT MET"]
    assert "1.30 × (130.0 vs 100.0 ms)" in found[0][1] and "2.31 ×" in found[1][1]

    missing = summary.evaluate_targets({"meta": {"device_name": "NVIDIA H200"}, "rows": rows[:1]})
    assert [v for _, _, v in missing] == ["not measured", "not measured", "NOT MET"]
    assert "matmul: not run" in missing[0][1] and "liger-chunked: not run" in missing[1][1]


def test_cpu_target_and_another_shape_is_named(tmp_path):
    rows = [row("ours", 12.0, n=2048, dtype="float32"), row("matmul", 10.0, n=2048, dtype="float32")]
    found = summary.evaluate_targets({"meta": {"device_name": "CPU X, 2 threads"}, "rows": rows})
    assert len(found) == 1 and found[0][2] == "met"  # 1.20 <= 1.25
    assert "not the target shape: N=2048" in found[0][1]


def test_render_reads_every_file_of_the_check(tmp_path):
    write_results(tmp_path, [row("ours", 110.0, peak=MIB), row("matmul", 100.0)])
    realistic = {
        "device": "NVIDIA H200",
        "shape": {"N": N, "H": H, "V": V, "dtype": "bf16"},
        "tolerance": 1e-2,
        "runs": {
            "single_pass": {
                "rel_errors": {"loss": 1e-5, "grad_weight": 3e-3},
                "passed": True,
                "loss_step_ms": 95.0,
                "logprobs_ms": 30.0,
                "loss_step_peak_bytes": 3000 * MIB,
                "memory_target_bytes": 2600 * MIB,
                "within_memory_target": False,
            }
        },
    }
    (tmp_path / "gpu_realistic_NVIDIA_H200.json").write_text(json.dumps(realistic))
    phases = {
        "meta": {"device_name": "NVIDIA H200", "date": "2026-12-02"},
        "matmul": {"time_ms": 90.0},
        "paths": [
            {
                "path": "single_pass",
                "status": "ok",
                "phases": [
                    {"phase": "logits_gemm", "time_ms": 30.0},
                    {"phase": "row_kernel", "time_ms": 9.0},
                ],
                "sum_ms": 39.0,
                "end_to_end_ms": 99.0,
                "consistent": True,
                "grad_rel_diff": 0.0,
            },
            {"path": "fused", "status": "error", "reason": "RuntimeError: boom"},
        ],
    }
    (tmp_path / "phases.json").write_text(json.dumps(phases))
    work = tmp_path / "work"
    work.mkdir()
    (work / "steps.tsv").write_text("bf16\tbf16 kernel tests\t90\t1\t42\nbench\tbench\t0\tnot run\t0\n")
    (work / "bf16.xml").write_text(
        '<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.ops.test_x" name="test_a[bf16]">'
        '<failure message="assert 1 == 2"/></testcase>'
        "</testsuite></testsuites>"
    )
    summary.main([str(tmp_path), "--work", str(work)])
    text = (tmp_path / "summary.md").read_text()
    assert "Commit this folder as `bench/results/nvidia-h200-2026-12-02/`" in text
    assert "| bf16 kernel tests | 90 | 42 | 1 | 3 passed, 1 failures, 1 skipped |" in text
    assert "| bench | 0 | 0 | not run |  |" in text
    assert "- `tests.ops.test_x::test_a[bf16]: assert 1 == 2`" in text
    assert "| single_pass | yes | 3.00e-03 (grad_weight) | 95.0 | 30.0 | 3000 | no (2600) |" in text
    assert "| single_pass | logits_gemm 30.00 · row_kernel 9.00 | 39.00 | 99.00 | 1.10 | yes |" in text
    assert "| fused | error: RuntimeError: boom |" in text
    assert "| ours ≤ 1.2 × the bare matmul" in text and "| 1.10 × (110.0 vs 100.0 ms) | met |" in text
    assert "| ours | custom | 16384 | 110.0 |" in text
