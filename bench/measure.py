"""Run one benchmark case and measure it: time per step and peak memory above the inputs.

Every case runs in a FRESH SUBPROCESS (``python -m bench.worker``) so that peak memory is that of
the case alone (no allocator state, compiled code or cached buffers from earlier cases):

- time: CUDA events on GPU, ``perf_counter`` on CPU; ``warmup`` untimed steps first (compilation,
  autotuning), then ``repeats`` timed steps; the median and the spread (min, max) are reported;
- peak memory: bytes above what is allocated once the inputs exist (so the inputs themselves
  are not counted, the gradients and every temporary are). GPU: ``torch.cuda.max_memory_allocated``
  after a reset. CPU: the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus its resident set before the first timed step; glibc is told to
  return every allocation above 256 KiB to the OS on free, so freed memory does not hide later peaks.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.shapes import Shape

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "MALLOC_TRIM_THRESHOLD_": str(256 * 1024)}
OVER_LIMIT = "over memory limit"


@dataclass
class CaseSpec:
    """What to run: a method on a task at a shape. ``mem_limit_bytes`` aborts the case once its
    memory above the inputs exceeds it (CPU: a watchdog thread; GPU: an allocator limit)."""

    method: str
    task: str
    shape: Shape
    dtype: str
    device: str
    warmup: int = 1
    repeats: int = 3
    mem_limit_bytes: int | None = None
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CaseSpec:
        data = json.loads(text)
        data["shape"] = Shape(**data["shape"])
        return cls(**data)


@dataclass
class CaseResult:
    status: str  # "ok" | "skipped" | "error"
    reason: str = ""
    times_ms: list[float] = field(default_factory=list)
    peak_mem_bytes: int | None = None
    over_limit: bool = False
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)  # what a problem reports besides time and memory

    @property
    def time_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.times_ms else None


# --- memory meters ------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class CpuMemoryMeter:
    """Peak resident memory of this process above a baseline taken by ``start``."""

    def __init__(self) -> None:
        self.baseline = 0
        self._can_reset = os.path.exists("/proc/self/clear_refs")

    @staticmethod
    def rss() -> int:
        return _proc_status_kib("VmRSS") * 1024

    def start(self) -> None:
        if self._can_reset:
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # resets VmHWM to the current RSS
            except OSError:
                self._can_reset = False
        self.baseline = self.rss()

    def peak_above_baseline(self) -> int:
        if self._can_reset:
            peak = _proc_status_kib("VmHWM") * 1024
        else:  # without a reset the lifetime peak is an upper bound
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(peak - self.baseline, 0)


class CudaMemoryMeter:
    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.baseline = 0

    def start(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()
        self.baseline = self.torch.cuda.memory_allocated()

    def peak_above_baseline(self) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated() - self.baseline


class _Watchdog(threading.Thread):
    """Aborts the process when its RSS grows more than ``limit`` bytes above ``meter.baseline``."""

    def __init__(self, meter: CpuMemoryMeter, limit: int, on_abort: Callable[[int], None]) -> None:
        super().__init__(daemon=True)
        self.meter, self.limit, self.on_abort = meter, limit, on_abort

    def run(self) -> None:
        while True:
            above = self.meter.rss() - self.meter.baseline
            if above > self.limit:
                self.on_abort(above)
                os._exit(3)
            time.sleep(0.01)


# --- one case -----------------------------------------------------------------------------------


def step_timer(device: str) -> Callable[[Callable[[], None]], float]:
    """``timed(step) -> ms``: CUDA events around the step on GPU (then a sync), ``perf_counter`` on CPU."""
    import torch

    if device == "cuda":

        def timed(step: Callable[[], None]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed_cpu(step: Callable[[], None]) -> float:
        start = time.perf_counter()
        step()
        return (time.perf_counter() - start) * 1e3

    return timed_cpu


def run_case(
    spec: CaseSpec, method: Callable | None = None, on_over_limit: Callable[[int], None] | None = None
) -> CaseResult:
    """Run ``spec`` in this process. Never raises: a ``Skip`` becomes status skipped, any other
    exception status error with its message. ``method`` overrides looking ``spec.method`` up."""
    import gc

    import torch

    from bench import methods, train_step
    from bench.methods import Skip

    tasks = train_step if spec.task in train_step.TASKS else methods  # a training step, or an LM-head one
    begin = time.perf_counter()
    try:
        if spec.device == "cuda" and not torch.cuda.is_available():
            raise Skip("no CUDA device")
        fn = method if method is not None else tasks.resolve_method(spec.method)
        problem = tasks.make_problem(spec.shape, spec.dtype, spec.device, spec.task, seed=spec.seed)
        step = fn(spec.task, problem)
        timed = step_timer(spec.device)
        for _ in range(spec.warmup):
            step()
        problem.zero_grad()  # the baseline holds the inputs only: the gradients count in the peak
        gc.collect()
        meter = CudaMemoryMeter() if spec.device == "cuda" else CpuMemoryMeter()
        meter.start()
        if spec.mem_limit_bytes is not None:
            if spec.device == "cuda":
                total = torch.cuda.get_device_properties(0).total_memory
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, (meter.baseline + spec.mem_limit_bytes) / total)
                )
            elif on_over_limit is not None:
                _Watchdog(meter, spec.mem_limit_bytes, on_over_limit).start()
        times = [timed(step) for _ in range(max(spec.repeats, 1))]
        peak = meter.peak_above_baseline()
        extra = dict(getattr(problem, "extra", {}))
        return CaseResult(
            "ok", times_ms=times, peak_mem_bytes=peak, wall_s=time.perf_counter() - begin, extra=extra
        )
    except Skip as skip:
        return CaseResult("skipped", reason=str(skip), wall_s=time.perf_counter() - begin)
    except torch.OutOfMemoryError as oom:
        first_line = str(oom).splitlines()[0] if str(oom) else "CUDA out of memory"
        return CaseResult(
            "error", reason=f"{OVER_LIMIT}: {first_line}", over_limit=True, wall_s=time.perf_counter() - begin
        )
    except Exception as err:  # noqa: BLE001 - every failure is reported, never raised
        where = traceback.extract_tb(err.__traceback__)[-1]
        message = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        return CaseResult(
            "error",
            reason=f"{message} (at {Path(where.filename).name}:{where.lineno})"[:500],
            wall_s=time.perf_counter() - begin,
        )


def run_case_isolated(spec: CaseSpec, timeout_s: float = 900.0) -> CaseResult:
    """Run ``spec`` in a fresh ``python -m bench.worker`` process; a crash, a kill (e.g. out of
    memory) or a timeout comes back as status error with the reason."""
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-case-") as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, **MALLOC_ENV}
        repo_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.worker", spec.to_json(), str(out)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            return CaseResult(
                "error", reason=f"timed out after {timeout_s:.0f} s", wall_s=time.perf_counter() - begin
            )
        if out.exists():
            result = CaseResult(**json.loads(out.read_text()))
        else:
            tail = " | ".join((proc.stderr or "").strip().splitlines()[-3:])
            killed = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
            result = CaseResult("error", reason=f"worker exited with {proc.returncode}{killed}: {tail}"[:500])
    result.wall_s = time.perf_counter() - begin
    return result


def write_result(result: CaseResult, path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        json.dump(asdict(result), handle)
    os.replace(tmp, path)
