"""The benchmark suites: which task, which flop count, which shapes, and the long-context search.

- ``loss``: fused loss forward + backward from hidden states (8·N·H·V flops: logits in the forward,
  recomputed in the backward, then dh and dW);
- ``logprobs``: log-probs forward only, no autograd (2·N·H·V flops);
- ``matmul``: the bare LM-head matmul forward + backward (2·N·H·V + 4·N·H·V flops), the floor;
- ``long-context``: per method, the largest N whose loss step fits a memory budget (search on N);
- ``train-step``: a causal LM's optimizer step per completion length and method, the longest completion that
  fits a budget, and the micro-batchings side by side (`bench.train_step`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bench.measure import CaseResult, CaseSpec
from bench.methods import METHODS, method_note, run_order
from bench.shapes import CPU_TARGET, CPU_TOKENS, GPU_PRESETS, GPU_TOKENS, Shape, preset_shape
from bench.train_step import BATCHING_METHODS, TRAIN_STEP_METHODS

GIB = 2**30
RunCase = Callable[[CaseSpec], CaseResult]


@dataclass(frozen=True)
class Suite:
    name: str
    task: str
    flop_factor: int  # flops = flop_factor * N * H * V
    flop_formula: str
    methods: tuple[str, ...]


ALL_METHODS = tuple(METHODS)
SUITES: dict[str, Suite] = {
    "loss": Suite("loss", "loss", 8, "8·N·H·V", ALL_METHODS),
    "logprobs": Suite("logprobs", "logprobs", 2, "2·N·H·V", ALL_METHODS),
    "matmul": Suite("matmul", "loss", 6, "6·N·H·V", ("matmul",)),
    "long-context": Suite(
        "long-context", "loss", 8, "8·N·H·V", tuple(m for m in ALL_METHODS if m != "matmul")
    ),
    # a training step of a causal LM (bench.train_step): its own methods, its own search
    "train-step": Suite("train-step", "train-step", 0, "", TRAIN_STEP_METHODS + BATCHING_METHODS),
}
MATMUL_FLOPS = {"loss": (6, "6·N·H·V"), "logprobs": (2, "2·N·H·V")}


def flop_count(suite: Suite, method: str, shape: Shape) -> tuple[float, str]:
    """Flops credited to one step, and the formula. The bare matmul is credited with what it does;
    every loss method with the same useful work, so TFLOP/s compare like for like."""
    factor, formula = (
        MATMUL_FLOPS[suite.task] if method == "matmul" else (suite.flop_factor, suite.flop_formula)
    )
    return float(factor) * shape.n * shape.h * shape.v, formula


def default_shapes(suite: str, device: str, quick: bool) -> list[Shape]:
    """GPU: the three 7B-class presets at N in {1k, 4k, 16k, 64k} (``--quick``: {1k, 4k}). CPU: the
    ``tiny`` head (H=512, V=32768) at N in {1k, 2k, 4k, 8k} (``--quick``: {2k, 8k}, 8k being the
    target). Long context: the start of the search (CPU: the cheaper ``tiny-lc`` head)."""
    if suite == "long-context":
        if device == "cuda":
            return [preset_shape(name, GPU_TOKENS[0]) for name in GPU_PRESETS]
        return [preset_shape("tiny-lc", CPU_TOKENS[0])]
    if device == "cuda":
        tokens = GPU_TOKENS[:2] if quick else GPU_TOKENS
        return [preset_shape(name, n) for name in GPU_PRESETS for n in tokens]
    tokens = (2048, CPU_TARGET[1]) if quick else CPU_TOKENS
    return [preset_shape(CPU_TARGET[0], n) for n in tokens]


def result_row(suite: Suite, method: str, spec: CaseSpec, result: CaseResult) -> dict:
    """One row of results.json."""
    shape = spec.shape
    flops, formula = flop_count(suite, method, shape)
    time_ms = result.time_ms
    return {
        "suite": suite.name,
        "method": method,
        "shape": shape.name,
        "n": shape.n,
        "h": shape.h,
        "v": shape.v,
        "dtype": spec.dtype,
        "device": spec.device,
        "status": result.status,
        "reason": result.reason,
        "note": method_note(method, spec.device),
        "time_ms": time_ms,
        "time_min_ms": min(result.times_ms) if result.times_ms else None,
        "time_max_ms": max(result.times_ms) if result.times_ms else None,
        "times_ms": result.times_ms,
        "repeats": len(result.times_ms),
        "peak_mem_bytes": result.peak_mem_bytes,
        "flops": flops,
        "flop_formula": formula,
        "tflops": flops / (time_ms * 1e-3) / 1e12 if time_ms else None,
        "ratio_to_matmul": None,
        "wall_s": round(result.wall_s, 2),
    }


def add_matmul_ratios(rows: list[dict]) -> None:
    """``ratio_to_matmul`` = time / time of the bare matmul at the same suite and shape."""
    matmul_time = {
        (r["suite"], r["shape"], r["n"]): r["time_ms"]
        for r in rows
        if r["method"] == "matmul" and r["status"] == "ok"
    }
    for row in rows:
        reference = matmul_time.get((row["suite"], row["shape"], row.get("n")))
        if row.get("time_ms") and reference:
            row["ratio_to_matmul"] = row["time_ms"] / reference


def cases(
    suite: Suite, shapes: list[Shape], methods: list[str], dtype: str, device: str, warmup: int, repeats: int
) -> list[tuple[str, CaseSpec]]:
    """The (method, spec) pairs of a timed suite, shape by shape so a partial run has whole shapes;
    within a shape ``ours`` and ``matmul`` first (`bench.methods.run_order`)."""
    chosen = suite_methods(suite, methods)
    return [
        (m, CaseSpec(m, suite.task, shape, dtype, device, warmup=warmup, repeats=repeats))
        for shape in shapes
        for m in chosen
    ]


def suite_methods(suite: Suite, methods: list[str]) -> list[str]:
    """The methods of ``methods`` that ``suite`` runs (plugins always), in run order."""
    return run_order([m for m in methods if m in suite.methods or m not in METHODS])


# --- long context --------------------------------------------------------------------------------


@dataclass
class SearchResult:
    max_n: int  # largest N seen to fit (0: not even the smallest)
    capped: bool  # the search stopped at n_max, still fitting
    probes: list[dict]
    status: str = "ok"
    reason: str = ""
    peak_at_max: int | None = None


def find_max_tokens(
    probe: Callable[[int], CaseResult],
    budget_bytes: int,
    n_min: int,
    n_max: int,
    granule: int = 1024,
    factor: int = 2,
) -> SearchResult:
    """Largest N (a multiple of ``granule``, in [n_min, n_max]) whose step peaks at or below
    ``budget_bytes``: multiplying by ``factor`` from ``n_min`` until a probe does not fit, then bisection
    down to a resolution of 1/8 of the bracket's lower end. A probe that fails for another reason than
    memory ends the search with status error (or skipped) and that reason."""
    probes: list[dict] = []
    peaks: dict[int, int | None] = {}

    def fits(n: int) -> bool | None:
        result = probe(n)
        probes.append(
            {
                "n": n,
                "status": result.status,
                "peak_mem_bytes": result.peak_mem_bytes,
                "reason": result.reason,
            }
        )
        if result.status == "ok":
            peaks[n] = result.peak_mem_bytes
            return result.peak_mem_bytes is not None and result.peak_mem_bytes <= budget_bytes
        return False if result.over_limit else None

    good, bad, n = 0, None, n_min
    while n <= n_max:
        verdict = fits(n)
        if verdict is None:
            last = probes[-1]
            return SearchResult(good, False, probes, status=last["status"], reason=last["reason"])
        if not verdict:
            bad = n
            break
        good = n
        n = n_max if n < n_max < factor * n else factor * n
    while bad is not None and good and bad - good > max(granule, good // 8):
        mid = (good + bad) // 2 // granule * granule
        if mid in (good, bad):
            break
        verdict = fits(mid)
        if verdict is None:
            last = probes[-1]
            return SearchResult(good, False, probes, status=last["status"], reason=last["reason"])
        good, bad = (mid, bad) if verdict else (good, mid)
    return SearchResult(good, bad is None and good > 0, probes, peak_at_max=peaks.get(good))


def long_context_row(
    method: str, shape: Shape, dtype: str, device: str, budget_bytes: int, n_max: int, search: SearchResult
) -> dict:
    reason = search.reason
    if search.status == "ok" and search.max_n == 0:
        reason = f"even N={search.probes[0]['n']} does not fit {budget_bytes / GIB:g} GiB"
    return {
        "suite": "long-context",
        "method": method,
        "shape": shape.name,
        "h": shape.h,
        "v": shape.v,
        "dtype": dtype,
        "device": device,
        "status": search.status,
        "reason": reason,
        "note": method_note(method, device),
        "budget_bytes": budget_bytes,
        "max_n": search.max_n,
        "capped": search.capped,
        "n_max": n_max,
        "peak_mem_bytes": search.peak_at_max,
        "probes": search.probes,
    }
