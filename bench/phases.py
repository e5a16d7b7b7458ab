"""``python -m bench.phases``: where the time of one fused loss step goes, phase by phase.

    python -m bench.phases --shape 16384x4096x151936 --dtype bf16 --out DIR
    python -m bench.phases --render DIR        # phases.md and phases.png again from DIR/phases.json

One step of `rpg_kernels.fused_linear_rpg_loss` (the benchmark's problem and RPG config, forward and
backward) runs through the library's orchestrator (`rpg_kernels.ops.fused_head.head_loss`), whose
``HeadOptions.laps`` hook marks the end of every phase; a timestamp is taken at each mark (CUDA events;
``perf_counter`` on CPU) and the phases are summed over the token chunks:

- ``single_pass`` (``method="single_pass"``, the CUDA default; `rpg_kernels.ops.single_pass`): prepare;
  per chunk the logits GEMM (``mm_fp32``), the row kernel (``launch_logit_rows``), the dh GEMM, the dW
  GEMM (``addmm_fp32_``), db; finish (per-token outputs, loss, metrics, gradients to the caller's dtypes);
- ``fused`` (``method="fused"``): prepare; ``linear_logprobs_forward``; the epilogue
  (``epilogue_loss_and_grads``); ``linear_logprobs_backward`` for dh, then for dW and db; finish;
- ``fused_atomic`` (``method="fused", deterministic=False``): the same with the atomic backward kernel.

Beside each path: its public call's end-to-end time (the benchmark's step) and the bare LM-head matmul
(`bench.methods.matmul`), and how far the replay's gradients are from the public call's (a replay that
computes something else is caught there). A warm-up run of every path and call compiles and autotunes
every JIT variant before anything is timed; every number is the median over ``--repeats``. Writes
``phases.json``, ``phases.md`` and ``phases.png`` (``--no-plot``: not the PNG) to ``--out``.

On CPU the Triton paths need the interpreter (``TRITON_INTERPRET=1`` before Triton is imported; for smoke
tests at tiny shapes); without it they are recorded as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.measure import step_timer
from bench.methods import METHODS, Problem, loss_config, make_problem, rpg_kernels_step
from bench.shapes import parse_shapes

IGNORE_INDEX = -100
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}
CONSISTENT = 1e-2  # largest relative difference of the replay's gradients from the public call's
INCONSISTENT = "INCONSISTENT: the replay computes something else than the public call"

# (phase, what it runs, flops per row as a multiple of H·V, or 0 where not a matrix product)
SINGLE_PASS = (
    ("prepare", "loss inputs, kept rows gathered, chunk buffers, fp32 dW/db accumulators zeroed", 0),
    ("logits_gemm", "z = h_c @ W.T into the fp32 chunk (mm_fp32)", 2),
    ("row_kernel", "statistics, per-token loss, dz (launch_logit_rows, MODE_LOSS)", 0),
    ("dh_gemm", "dh_c = dz @ W (and its scatter to the kept rows)", 2),
    ("dw_gemm", "dW += dz.T @ h_c in fp32 (addmm_fp32_)", 2),
    ("db", "db += sum of dz over the chunk (with a bias only)", 0),
    ("finish", "per-token outputs scattered, loss, metrics, grads to the caller's dtypes", 0),
)
FUSED = (
    ("prepare", "loss inputs", 0),
    ("forward", "linear_logprobs_forward: logits tiles, partial statistics, combine", 2),
    ("epilogue", "epilogue_loss_and_grads: per-token loss and its gradient", 0),
    ("backward_dh", "linear_logprobs_backward, dh only (logits recomputed)", 4),
    ("backward_dw", "linear_logprobs_backward, dW and db (logits recomputed)", 4),
    ("backward_atomic", "linear_logprobs_backward, deterministic=False: one kernel, atomic dh/dW", 6),
    ("finish", "grads to the caller's dtypes", 0),
)


@dataclass(frozen=True)
class PhasePath:
    """One way the library runs the step, the phases it has, and its title."""

    name: str
    method: str
    deterministic: bool
    phases: tuple[tuple[str, str, int], ...]
    title: str


PATHS = (
    PhasePath("single_pass", "single_pass", True, SINGLE_PASS, 'method="single_pass" (the CUDA default)'),
    PhasePath(
        "fused",
        "fused",
        True,
        tuple(p for p in FUSED if p[0] != "backward_atomic"),
        'method="fused" (deterministic backward)',
    ),
    PhasePath(
        "fused_atomic",
        "fused",
        False,
        tuple(p for p in FUSED if p[0] not in ("backward_dh", "backward_dw")),
        'method="fused", deterministic=False (atomic backward)',
    ),
)


class Laps:
    """Time from the previous mark to this one, attributed to a phase: CUDA events recorded in stream
    order on GPU (read after one sync at the end), ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []
        self.last: object = None

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self.last = self._now()

    def lap(self, phase: str) -> None:
        now = self._now()
        self.marks.append((phase, self.last, now))
        self.last = now

    def totals(self) -> tuple[dict[str, float], dict[str, int]]:
        """``(ms per phase, calls per phase)``."""
        if self.cuda:
            torch.cuda.synchronize()
        ms: dict[str, float] = defaultdict(float)
        calls: dict[str, int] = defaultdict(int)
        for phase, start, end in self.marks:
            ms[phase] += start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            calls[phase] += 1
        return dict(ms), dict(calls)


# --- the replays: the library's functions, in the order the library calls them ----------------------


def replay(p: Problem, laps: Laps, method: str, deterministic: bool, workspace_bytes: int | None) -> tuple:
    """`rpg_kernels.ops.fused_head.head_loss` as `rpg_kernels.fused_linear_rpg_loss` calls it for ``p``, its
    phases marked by the ``HeadOptions.laps`` hook; returns the caller's ``(dh, dW, db)`` and, for the
    single pass, the chunk plan ``(kept rows, rows per chunk)``."""
    from rpg_kernels.loss.inputs import validate_loss_inputs
    from rpg_kernels.ops.autograd import caller_grads, make_head
    from rpg_kernels.ops.fused_head import head_loss
    from rpg_kernels.ops.lm_head import DEFAULT_WORKSPACE_BYTES, HeadOptions
    from rpg_kernels.ops.single_pass import chunk_rows

    laps.start()
    config = loss_config()
    hidden = p.hidden.detach().reshape(-1, p.shape.h)
    keep = (p.mask != 0) & (p.targets != IGNORE_INDEX)
    inputs = validate_loss_inputs(None, p.old_logprobs, p.advantages, keep, p.ref_logprobs, config=config)
    head = make_head(hidden, p.weight, p.bias, p.targets.reshape(-1), hidden.dtype, 1.0, IGNORE_INDEX)
    workspace = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    need = (True, True, p.bias is not None)
    options = HeadOptions("triton", method, deterministic, workspace, need, laps=laps.lap)
    _, _, grads = head_loss(head, inputs, config, None, 0.0, options)
    out = caller_grads(grads, p.hidden, p.weight, p.bias)  # outside the laps: a dtype cast or nothing
    rows = int(inputs.mask.sum())
    plan = (rows, chunk_rows(rows, p.shape.v, hidden.dtype, workspace)) if method == "single_pass" else None
    return out, plan


# --- measuring ---------------------------------------------------------------------------------------


def triton_available(device: torch.device) -> str:
    """Why the Triton paths cannot run on ``device`` ("" when they can)."""
    from rpg_kernels.ops.dispatch import triton_interpreter_enabled

    if device.type == "cuda" or triton_interpreter_enabled():
        return ""
    return "the Triton kernels need CUDA, or TRITON_INTERPRET=1 (set before Triton is imported) on CPU"


def rel_diff(actual: tuple, expected: tuple) -> float:
    """The largest ``||a - e|| / ||e||`` over the gradients (inf where only one of the two has one)."""
    worst = 0.0
    for a, e in zip(actual, expected):
        if a is None and e is None:
            continue
        if a is None or e is None:
            return float("inf")
        e = e.detach().float()
        worst = max(worst, ((a.float() - e).norm() / e.norm().clamp(min=1e-30)).item())
    return worst


def measure_path(path: PhasePath, p: Problem, repeats: int, warmup: int, workspace_bytes: int | None) -> dict:
    """The phases (median over ``repeats``), the public call end to end, and the replay's consistency."""
    device = p.device
    options: dict[str, object] = dict(backend="triton", method=path.method, deterministic=path.deterministic)
    if workspace_bytes is not None:
        options["workspace_bytes"] = workspace_bytes
    public = rpg_kernels_step("loss", p, **options)
    run_replay: Callable[[Laps], tuple] = lambda laps: replay(  # noqa: E731
        p, laps, path.method, path.deterministic, workspace_bytes
    )
    timed = step_timer(device.type)
    for _ in range(warmup):  # compiles and autotunes every kernel variant both runs launch
        run_replay(Laps(device))
        public()
    per_phase: dict[str, list[float]] = defaultdict(list)
    sums, end_to_end, calls, plan, grads = [], [], {}, None, None
    for _ in range(repeats):
        laps = Laps(device)
        grads, plan = run_replay(laps)
        ms, calls = laps.totals()
        for phase, value in ms.items():
            per_phase[phase].append(value)
        sums.append(sum(ms.values()))
        end_to_end.append(timed(public))
    expected = (p.hidden.grad, p.weight.grad, p.bias.grad if p.bias is not None else None)
    diff = rel_diff(grads, expected)
    rows_run = plan[0] if plan is not None else p.shape.n
    phases = []
    for name, what, flops_per_row in path.phases:
        if name not in per_phase:
            continue  # db without a bias
        median = statistics.median(per_phase[name])
        flops = flops_per_row * rows_run * p.shape.h * p.shape.v
        phases.append(
            {
                "phase": name,
                "what": what,
                "calls": calls[name],
                "time_ms": median,
                "times_ms": per_phase[name],
                "flops": flops or None,
                "tflops": flops / (median * 1e-3) / 1e12 if flops and median > 0 else None,
            }
        )
    result = {
        "path": path.name,
        "title": path.title,
        "options": options,
        "status": "ok",
        "reason": "",
        "phases": phases,
        "sum_ms": statistics.median(sums),
        "end_to_end_ms": statistics.median(end_to_end),
        "end_to_end_times_ms": end_to_end,
        "grad_rel_diff": diff,
        "consistent": diff <= CONSISTENT,
        "rows_run": rows_run,
    }
    if plan is not None:
        result["chunk_rows"] = plan[1]
        result["chunks"] = calls.get("logits_gemm", 0)
    return result


def _default_workspace() -> int:
    from rpg_kernels.ops.lm_head import DEFAULT_WORKSPACE_BYTES

    return DEFAULT_WORKSPACE_BYTES


def measure_matmul(p: Problem, repeats: int, warmup: int) -> dict:
    """The bare LM-head matmul forward + backward (`bench.methods.matmul`), median over ``repeats``."""
    step, timed = METHODS["matmul"]("loss", p), step_timer(p.device.type)
    for _ in range(warmup):
        step()
    times = [timed(step) for _ in range(repeats)]
    return {"time_ms": statistics.median(times), "times_ms": times}


def run(args: argparse.Namespace) -> dict:
    """Measure every path of ``args.paths`` at ``args.shape``, write the files, return phases.json's data."""
    from bench.__main__ import device_name, git_commit, versions

    (shape,) = parse_shapes([args.shape], default_tokens=(args.tokens,))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype]
    p = make_problem(shape, dtype, device.type, "loss", seed=args.seed, bias=args.bias)
    meta = {
        "device": device.type,
        "device_name": device_name(device.type),
        "dtype": dtype,
        "shape": {"n": shape.n, "h": shape.h, "v": shape.v},
        "bias": args.bias,
        "kept_rows": int(((p.mask != 0) & (p.targets != IGNORE_INDEX)).sum()),
        "workspace_bytes": args.workspace_bytes or _default_workspace(),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "command": " ".join(["python -m bench.phases", *args.argv]),
    }
    data = {"meta": meta, "matmul": measure_matmul(p, args.repeats, args.warmup), "paths": []}
    unavailable = triton_available(device)
    try:
        for path in PATHS:
            if path.name in args.paths:
                data["paths"].append(_measure_or_explain(path, p, args, unavailable))
                write(args.out, data, png=False)  # after every path: a run cut short keeps what it measured
                p.zero_grad()
    finally:
        write(args.out, data, png=not args.no_plot)
    return data


def _measure_or_explain(path: PhasePath, p: Problem, args: argparse.Namespace, unavailable: str) -> dict:
    """`measure_path`, or the path's status ``skipped`` / ``error`` with the reason; never raises."""
    begin = time.perf_counter()
    if unavailable:
        result = {"path": path.name, "title": path.title, "status": "skipped", "reason": unavailable}
    else:
        try:
            result = measure_path(path, p, args.repeats, args.warmup, args.workspace_bytes)
        except Exception as err:  # noqa: BLE001 - one path failing never hides the others
            where = traceback.extract_tb(err.__traceback__)[-1]
            text = str(err).strip()
            reason = f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
            result = {"path": path.name, "title": path.title, "status": "error"}
            result["reason"] = f"{reason} (at {Path(where.filename).name}:{where.lineno})"[:500]
    result["wall_s"] = round(time.perf_counter() - begin, 2)
    print(f"phases: {path.name} {result['status']} in {result['wall_s']} s", file=sys.stderr, flush=True)
    return result


# --- reports -----------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    """phases.md: one table per path (phase, calls, median ms, share, TFLOP/s), end to end and the matmul."""
    meta, matmul_ms = data["meta"], data["matmul"]["time_ms"]
    s = meta["shape"]
    out = [
        f"# Phases of one fused loss step: {meta['device_name']}",
        "",
        f"`{meta['command']}` · {meta['date']} · commit `{meta['git_commit']}` · {meta['dtype']} · "
        f"N={s['n']}, H={s['h']}, V={s['v']}{' + bias' if meta['bias'] else ''} · {meta['kept_rows']} rows "
        f"kept by the mask · workspace {meta['workspace_bytes'] / 2**20:.3g} MiB",
        "",
        f"Median of {meta['repeats']} repeats after {meta['warmup']} warm-up run(s) of every path (every "
        "kernel compiled and autotuned first). A phase's time runs from the end of the previous phase to "
        "its own end (GPU: CUDA events in stream order; CPU: perf_counter), summed over the chunks; "
        "TFLOP/s count the matrix "
        "products on the rows the phase runs over. End to end: the public call (`fused_linear_rpg_loss` "
        f"+ backward) timed as `python -m bench` times it. Bare matmul fwd+bwd: {matmul_ms:.2f} ms.",
        "",
    ]
    for path in data["paths"]:
        out += [f"## `{path['path']}`: {path['title']}", ""]
        if path["status"] != "ok":
            out += [f"{path['status']}: {path['reason']}", ""]
            continue
        plan = f" ({path['chunks']} chunks of at most {path['chunk_rows']} rows)" if "chunks" in path else ""
        out += [
            f"Rows run: {path['rows_run']}{plan}.",
            "",
            "| phase | what | calls | ms (median) | share | TFLOP/s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for ph in path["phases"]:
            tflops = "—" if ph["tflops"] is None else f"{ph['tflops']:.3g}"
            share = 100 * ph["time_ms"] / path["sum_ms"] if path["sum_ms"] else 0.0
            out.append(
                f"| {ph['phase']} | {ph['what']} | {ph['calls']} | {ph['time_ms']:.3f} | {share:.1f} % "
                f"| {tflops} |"
            )
        e2e = path["end_to_end_ms"]
        out += [
            f"| **sum of phases** | | | **{path['sum_ms']:.3f}** | 100 % | |",
            f"| end to end (public call) | validation, autograd and launches included | | {e2e:.3f} | | |",
            "",
            f"End to end × bare matmul: **{e2e / matmul_ms:.2f}**. Replay's gradients vs the public call's: "
            f"relative difference {path['grad_rel_diff']:.2e} "
            f"({'consistent' if path['consistent'] else INCONSISTENT}).",
            "",
        ]
    return "\n".join(out)


def draw(data: dict, path: Path) -> bool:
    """phases.png: a stacked bar per path (one segment per phase), the end-to-end time and the matmul."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no phases.png (`python -m bench.phases --render DIR`)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [p for p in data["paths"] if p["status"] == "ok"]
    names = list(dict.fromkeys(ph["phase"] for p in paths for ph in p["phases"]))
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.9 * (len(paths) + 1)))
    labels = [p["path"] for p in paths] + ["bare matmul"]
    for row, p in enumerate(paths):
        left = 0.0
        for ph in p["phases"]:
            ax.barh(row, ph["time_ms"], left=left, color=colours[ph["phase"]], edgecolor="white")
            left += ph["time_ms"]
        ax.plot([p["end_to_end_ms"]] * 2, [row - 0.45, row + 0.45], color="black", linewidth=2)
    ax.barh(len(paths), data["matmul"]["time_ms"], color="grey")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    handles.append(plt.Line2D([0], [0], color="black", linewidth=2))
    ax.legend(handles, [*names, "end to end"], fontsize=8, loc="lower right")
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("ms per loss step (forward + backward), median")
    s, meta = data["meta"]["shape"], data["meta"]
    ax.set_title(f"{meta['device_name']}: {meta['dtype']}, N={s['n']}, H={s['h']}, V={s['v']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out: Path, data: dict, png: bool = True) -> None:
    """phases.json, phases.md and (unless ``png`` is False) phases.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "phases.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "phases.md").write_text(markdown(data))
    if png:
        draw(data, out / "phases.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.phases",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", default="16384x4096x151936", help="NxHxV or PRESET:N (bench/shapes.py)")
    parser.add_argument("--tokens", type=int, default=16384, help="N for a bare PRESET --shape")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every path first (>= 1)")
    parser.add_argument("--workspace-bytes", type=int, default=None, help="the single pass's budget")
    parser.add_argument("--bias", action="store_true", help="an LM-head bias (times the db phase)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--paths", nargs="+", default=[p.name for p in PATHS], choices=[p.name for p in PATHS]
    )
    parser.add_argument("--out", type=Path, default=Path("phases-results"))
    parser.add_argument("--no-plot", action="store_true", help="no phases.png")
    parser.add_argument(
        "--render", type=Path, default=None, metavar="DIR", help="redraw from DIR/phases.json"
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.dtype is None:
        cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
        args.dtype = "bf16" if cuda else "fp32"
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first run compiles")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        data = json.loads((args.render / "phases.json").read_text())
        write(args.render, data, png=not args.no_plot)
    else:
        data = run(args)
        args.render = args.out
    print((args.render / "phases.md").read_text())


if __name__ == "__main__":
    main()
