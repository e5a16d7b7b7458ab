"""Every kernel configuration the package can launch compiles for sm_80 and sm_90 (no GPU needed).

The compilation runs in subprocesses without ``TRITON_INTERPRET`` (see ``compile_worker.py``), one per
architecture, side by side. Checks: the count of compiled variants, tensor-core instructions
(``wgmma`` on sm_90, ``mma.sync`` on sm_80) for fp16/bf16 operands, no register spills in the main
(fp16/bf16, aligned) configurations, shared memory within the hardware limit.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.compile_worker import cases

WORKER = Path(__file__).with_name("compile_worker.py")
REPO = Path(__file__).resolve().parents[2]
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FP32_SPILL_LIMIT = 512  # bytes; the fp32 ("ieee", CUDA-core) tiles are the slow exact path, see tile_configs


@pytest.fixture(scope="module")
def compiled() -> dict[int, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {
        cc: subprocess.Popen(
            [sys.executable, str(WORKER), str(cc)],
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
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{cc} compile worker failed:\n{err[-4000:]}"
        results[cc] = json.loads(out)
    return results


@pytest.mark.parametrize("cc", [80, 90])
def test_every_configuration_compiles(compiled, cc):
    expected = list(cases(cc))
    assert len(compiled[cc]) == len(expected) > 0
    families = {r["family"] for r in compiled[cc]}
    assert families == {"forward", "backward_dz", "backward_dh", "backward_dw", "backward_atomic"}
    assert {r["dtype"] for r in compiled[cc]} == {"fp16", "bf16", "fp32"}


def test_tensor_core_instructions(compiled):
    for cc, results in compiled.items():
        for r in results:
            if r["dtype"] == "fp32":
                continue
            where = f"sm_{cc} {r['kernel']} {r['dtype']} {r['config']}"
            assert r["mma"], f"{where}: no tensor-core MMA in the PTX"
            if cc == 90:
                assert r["wgmma"], f"{where}: the sm_90 matmul loops must use wgmma"
            else:
                assert not r["wgmma"], where


def test_no_register_spills_in_main_configurations(compiled):
    for cc, results in compiled.items():
        for r in results:
            if not r["aligned"]:
                continue
            where = f"sm_{cc} {r['kernel']} {r['dtype']} {r['constexprs']} {r['config']} w{r['num_warps']}"
            limit = FP32_SPILL_LIMIT if r["dtype"] == "fp32" else 0
            assert r["spill_bytes"] <= limit, f"{where}: {r['spill_bytes']} bytes of register spills"


def test_shared_memory_fits(compiled):
    for cc, results in compiled.items():
        for r in results:
            assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[cc], f"sm_{cc} {r['kernel']} {r['config']}"
