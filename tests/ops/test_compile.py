"""Every kernel configuration the package can launch compiles for sm_80 and sm_90 (no GPU needed).

One worker (``compile_worker.py``) per architecture, side by side, in subprocesses without
``TRITON_INTERPRET``, over every kernel module's ``aot_variants()``. Checks: the count and the families,
tensor-core instructions (``wgmma`` on sm_90, ``mma.sync`` on sm_80) in the fp16/bf16 matmul kernels, no
register spills inside the MMA (K) loops, no spills at all in the row and epilogue kernels, shared memory
within the hardware limit. The slow test adds every constexpr combination of the per-token loss epilogue.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.compile_worker import FIXED_LAUNCH, cases

WORKER = Path(__file__).with_name("compile_worker.py")
REPO = Path(__file__).resolve().parents[2]
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Outside the K loops (set-up, softmax epilogue) a few spilled registers cost nothing measurable; fp32
# operands run the exact CUDA-core path, which is not tuned.
SPILL_LIMIT = 512
FAMILIES = {"forward", "backward_dh", "backward_dw", "backward_atomic", "logit_rows", "token_loss_epilogue"}


def run_workers(*args: str, timeout: float) -> dict[int, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        cc: subprocess.Popen(
            [sys.executable, str(WORKER), str(cc), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cc in (80, 90)
    }
    results = {}
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"sm_{cc} compile worker failed:\n{err[-4000:]}"
        results[cc] = json.loads(out)
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    return run_workers(timeout=1200)


def check(results: list[dict], cc: int) -> None:
    for r in results:
        where = f"sm_{cc} {r['kernel']} {r['dtype']} {r['constexprs']} {r['config']} w{r['num_warps']}"
        assert r["cubin_bytes"] > 0 and r["target"].startswith(f"sm_{cc}"), where
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[cc], where
        if r["family"] in FIXED_LAUNCH:  # the fp64 loss math (gradcheck precision) is not tuned
            limit = SPILL_LIMIT if r["constexprs"].get("COMPUTE") == "fp64" else 0
            assert r["spill_bytes"] <= limit, f"{where}: {r['spill_bytes']} bytes of register spills"
            continue
        if r["dtype"] != "fp32":
            assert r["mma"], f"{where}: no tensor-core MMA in the PTX"
            assert r["wgmma"] == (cc == 90), f"{where}: wgmma on sm_90 (and only there)"
        if r["aligned"]:
            assert r["mma_loop_spills"] == 0, (
                f"{where}: {r['mma_loop_spills']} spill instructions in the K loop"
            )
            assert r["spill_bytes"] <= SPILL_LIMIT, f"{where}: {r['spill_bytes']} bytes of register spills"


@pytest.mark.parametrize("cc", [80, 90])
def test_every_configuration_compiles(compiled, cc):
    expected = list(cases(cc))
    assert len(compiled[cc]) == len(expected) > 0
    assert {r["family"] for r in compiled[cc]} == FAMILIES
    assert {r["dtype"] for r in compiled[cc] if r["family"] == "logit_rows"} == {"fp16", "bf16", "fp32"}
    check(compiled[cc], cc)


def test_the_k_loops_are_found(compiled):
    """Guard for the spill rule: the SASS scan finds the K loop of every tensor-core matmul kernel (a scan
    that found none would pass any configuration)."""
    tensor_core = [r for rs in compiled.values() for r in rs if r["family"] not in FIXED_LAUNCH and r["mma"]]
    assert len(tensor_core) > 20
    for r in tensor_core:
        assert r["mma_loops"] >= 1, f"sm_{r['cc']} {r['kernel']} {r['config']}: no MMA loop found in the SASS"


@pytest.mark.slow
def test_every_epilogue_combination_compiles():
    for cc, results in run_workers("--every", timeout=2400).items():
        epilogue = [r for r in results if r["family"] == "token_loss_epilogue"]
        assert len(epilogue) == len(results) == 80  # 40 (ALGO, KL, CLIP_MODE) x 2 compute dtypes
        seen = {tuple(r["constexprs"][k] for k in ("ALGO", "KL", "CLIP_MODE", "COMPUTE")) for r in epilogue}
        assert len(seen) == 80
        check(results, cc)
