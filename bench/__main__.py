"""``python -m bench``: the methods side by side on one machine; results under bench/results/.

python -m bench --quick                        # CPU: ~the target shape + a short sweep
python -m bench --suite loss --shapes qwen2.5-7b:4k,16k --methods naive liger-chunked ours
python -m bench --suite long-context --budget-gib 40
python -m bench --suite train-step --quick      # a causal LM's training step vs TRL and plain transformers
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

try:
    from tqdm import tqdm as progress_bar
except ImportError:  # a bare machine: a line per case instead of a bar, the same results
    progress_bar = None

from bench import results_root
from bench.measure import CaseResult, CaseSpec, run_case, run_case_isolated
from bench.methods import METHODS
from bench.report import plot_suites, write_json, write_markdown
from bench.shapes import CPU_TOKENS, GPU_TOKENS, Shape, default_dtype, parse_shapes
from bench.suites import (
    GIB,
    SUITES,
    RunCase,
    Suite,
    add_matmul_ratios,
    cases,
    default_shapes,
    find_max_tokens,
    long_context_row,
    result_row,
    suite_methods,
)
from bench.train_step import (
    BATCHING_METHODS,
    completion_lengths,
    default_models,
    fit_row,
    model_shape,
    padding_rows,
    spread_cap,
    step_row,
)

SUITE_ORDER = ("loss", "logprobs", "matmul", "long-context")  # --suite all (the LM head's)
TRAIN_STEP = "train-step"  # a causal LM's step: on its own (CPU --quick: ~12 minutes)
PACKAGES = ("torch", "triton", "numpy", "liger_kernel", "cut_cross_entropy", "rpg-kernels")


class LineProgress:
    """What the run uses of a tqdm bar, as one printed line per case (where tqdm is not installed)."""

    def __init__(self, total: int, **_: object) -> None:
        self.total, self.done = total, 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_postfix_str(self, text: str) -> None:
        print(f"bench [{self.done + 1}/{self.total}] {text}", file=sys.stderr, flush=True)

    def update(self) -> None:
        self.done += 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", default="all", choices=(*SUITE_ORDER, TRAIN_STEP, "all"))
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="PRESET, PRESET:N[,N..] or NxHxV (N may be 16k); presets: see bench/shapes.py; train-step: "
        "MODEL:N[,N..] (completion lengths; models: see bench/train_step.py)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help=f"{' '.join(METHODS)} or FILE.py:FUNCTION (default: all of the suite's)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats (the CPU check)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: bench/results/<device>-<date>, see bench.results_root)",
    )
    parser.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="long-context / train-step memory budget above the inputs (default: GPU 90%% of its memory, "
        "CPU 1 / 8)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="long-context search cap on N (default: GPU 1M, CPU 16k)"
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per case (default 5; --quick 2)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation, autotuning)")
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of every case (default: torch's); 1 on a shared machine, where OpenMP's waiting "
        "threads slow small ops down many times over",
    )
    parser.add_argument("--case-timeout", type=float, default=1800.0, help="seconds one case may take")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run cases in this process (debugging; peak memory is then not per case)",
    )
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    return args


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model}, {torch.get_num_threads()} threads"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def git_commit() -> str:
    """The checkout's short commit (``+dirty`` with uncommitted library or bench changes); where there is
    no git repository (a copy of the tree on a lent machine), ``$RPG_GIT_COMMIT`` or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rpg_kernels", "rpg_train", "bench"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("RPG_GIT_COMMIT", "unknown")


def run(args: argparse.Namespace) -> Path:
    """Run the chosen suites; write results.json / results.md / PNGs; return the folder."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:  # this process and, through the environment, every case's fresh one
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    dtype = default_dtype(device)
    repeats = args.repeats or (2 if args.quick else 5)
    name = device_name(device)
    now = dt.datetime.now(dt.timezone.utc)
    suffix = f"-{TRAIN_STEP}" if args.suite == TRAIN_STEP else ""
    out_dir = args.out or results_root() / f"{slug(name.split(',')[0])}-{now:%Y-%m-%d}{suffix}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "device": device,
        "device_name": name,
        "dtype": dtype,
        "threads": torch.get_num_threads(),
        "date": now.isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "versions": versions(),
        "command": args.command,
        "quick": args.quick,
        "repeats": repeats,
        "warmup": args.warmup,
    }

    def runner(spec: CaseSpec):
        return run_case(spec) if args.in_process else run_case_isolated(spec, timeout_s=args.case_timeout)

    suites = (args.suite,)
    if args.suite == "all":  # --quick: the matmul rows of the loss/logprobs tables stand for the matmul suite
        suites = tuple(s for s in SUITE_ORDER if not (args.quick and s == "matmul"))
    default_tokens = GPU_TOKENS if device == "cuda" else CPU_TOKENS
    plan = []
    for suite_name in suites:
        suite = SUITES[suite_name]
        if suite_name == TRAIN_STEP:
            plan.append((suite, train_step_models(args.shapes, device, args.quick), list(args.methods or [])))
            continue
        shapes = (
            parse_shapes(args.shapes, default_tokens)
            if args.shapes
            else default_shapes(suite_name, device, args.quick)
        )
        methods = list(args.methods) if args.methods else list(suite.methods)
        if suite_name == "matmul" and args.methods:
            methods = ["matmul"]
        plan.append((suite, shapes, methods))

    rows: list[dict] = []

    def count(suite: Suite, shapes: list, methods: list[str]) -> int:
        if suite.name == TRAIN_STEP:  # the sweeps and the micro-batchings; the search's probes add to it
            chosen = suite_methods(suite, methods or list(suite.methods))
            spread = sum(m in BATCHING_METHODS for m in chosen)
            return sum(len(lengths) * (len(chosen) - spread) + spread for _, lengths in shapes)
        if suite.name == "long-context":
            return len(shapes) * len(suite_methods(suite, methods))
        return len(cases(suite, shapes, methods, dtype, device, args.warmup, repeats))

    total = sum(count(s, sh, m) for s, sh, m in plan)

    def save(row: dict) -> None:  # after every case, so partial results survive an interruption
        rows.append(row)
        add_matmul_ratios(rows)
        write_json(out_dir / "results.json", meta, rows)

    try:
        bar_type = progress_bar if progress_bar is not None else LineProgress
        with bar_type(total=total, desc="bench", unit="case", dynamic_ncols=True) as bar:
            for suite, shapes, methods in plan:
                if suite.name == "long-context":
                    _long_context(args, suite, shapes, methods, dtype, device, runner, bar, save)
                    continue
                if suite.name == TRAIN_STEP:
                    _train_step(args, suite, shapes, methods, dtype, device, runner, bar, save, repeats)
                    continue
                for method, spec in cases(suite, shapes, methods, dtype, device, args.warmup, repeats):
                    bar.set_postfix_str(f"{suite.name} {method} N={spec.shape.n}")
                    save(result_row(suite, method, spec, runner(spec)))
                    bar.update()
    finally:  # an interrupted run (Ctrl-C, a time limit's SIGINT) still gets its tables and plots
        write_report(out_dir, meta, rows)
    return out_dir


def write_report(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    """results.md and the PNG plots of ``rows`` (the plots only where matplotlib is installed)."""
    plots = plot_suites(out_dir, rows)
    write_markdown(out_dir / "results.md", meta, rows, plots)


def _long_context(
    args: argparse.Namespace,
    suite: Suite,
    shapes: list[Shape],
    methods: list[str],
    dtype: str,
    device: str,
    runner: RunCase,
    bar: LineProgress,
    save: Callable[[dict], None],
) -> None:
    budget = int((args.budget_gib if args.budget_gib is not None else _default_budget_gib(device)) * GIB)
    n_max = args.max_tokens or (2**20 if device == "cuda" else 16384)
    chosen = suite_methods(suite, methods)
    for shape in shapes:
        for method in chosen:

            def probe(n: int, method: str = method, shape: Shape = shape):
                bar.set_postfix_str(f"long-context {method} N={n}")
                # one cold step per probe, aborted once it passes the budget by 5%
                spec = CaseSpec(
                    method,
                    suite.task,
                    shape.with_n(n),
                    dtype,
                    device,
                    warmup=0,
                    repeats=1,
                    mem_limit_bytes=int(budget * 1.05),
                )
                return runner(spec)

            search = find_max_tokens(probe, budget, n_min=shape.n, n_max=n_max)
            save(long_context_row(method, shape, dtype, device, budget, n_max, search))
            bar.update()


def _default_budget_gib(device: str, suite: str = "long-context") -> float:
    if device == "cuda":
        return 0.9 * torch.cuda.get_device_properties(0).total_memory / GIB
    return 8.0 if suite == TRAIN_STEP else 1.0


def train_step_models(specs: list[str] | None, device: str, quick: bool) -> list[tuple[str, list[int]]]:
    """``(model, completion lengths)`` pairs of the train-step suite: ``--shapes MODEL[:N,N..]``, else the
    device's model at `bench.train_step.completion_lengths`."""
    from bench.shapes import _tokens

    if not specs:
        return [(model, completion_lengths(device, quick)) for model in default_models(device)]
    out = []
    for spec in specs:
        model, _, tokens = spec.strip().lower().partition(":")
        model_shape(model, 1)  # an unknown model fails here, before anything runs
        lengths = (
            sorted(_tokens(t) for t in tokens.split(",")) if tokens else completion_lengths(device, quick)
        )
        out.append((model, lengths))
    return out


def _train_step(
    args: argparse.Namespace,
    suite: Suite,
    models: list[tuple[str, list[int]]],
    methods: list[str],
    dtype: str,
    device: str,
    runner: RunCase,
    bar: LineProgress,
    save: Callable[[dict], None],
    repeats: int,
) -> None:
    """Per model: the padding of each micro-batching (no model), then per method the sweep over completion
    lengths, ``repeats`` steps each, and a search for the longest completion that fits the budget
    (bisection between the last length that fit and the first that did not, one step per probe); then the
    micro-batchings on the spread batch."""
    budget = int(
        (args.budget_gib if args.budget_gib is not None else _default_budget_gib(device, TRAIN_STEP)) * GIB
    )
    chosen = suite_methods(suite, methods or list(suite.methods))
    for row in padding_rows():
        save(row)
    for model, lengths in models:
        sweep = set(lengths)
        for method in [m for m in chosen if m not in BATCHING_METHODS]:

            def probe(
                n: int, method: str = method, model: str = model, sweep: set[int] = sweep
            ) -> CaseResult:
                timed = n in sweep
                if not timed:  # a search probe beyond the planned sweep
                    bar.total += 1
                bar.set_postfix_str(f"train-step {method} {model} completion={n}")
                spec = CaseSpec(
                    method,
                    TRAIN_STEP,
                    model_shape(model, n),
                    dtype,
                    device,
                    warmup=0,
                    repeats=repeats if timed else 1,
                    mem_limit_bytes=int(budget * 1.05),
                )
                result = runner(spec)
                save(
                    step_row(
                        TRAIN_STEP,
                        method,
                        spec.shape,
                        dtype,
                        device,
                        result,
                        budget,
                        "sweep" if timed else "search",
                    )
                )
                bar.update()
                return result

            factor = lengths[1] // lengths[0] if len(lengths) > 1 else 2
            search = find_max_tokens(probe, budget, lengths[0], lengths[-1], granule=512, factor=factor)
            shape = model_shape(model, search.max_n)
            save(fit_row(method, shape, dtype, device, budget, lengths[-1], search))
            unprobed = sweep - {p["n"] for p in search.probes}  # past the first length that did not fit
            bar.total -= len(unprobed)
        for method in [m for m in chosen if m in BATCHING_METHODS]:
            bar.set_postfix_str(f"micro-batching {method} {model}")
            spec = CaseSpec(
                method,
                "micro-batching",
                model_shape(model, spread_cap(device)),
                dtype,
                device,
                warmup=0,
                repeats=repeats,
                mem_limit_bytes=int(budget * 1.05),
            )
            save(step_row("micro-batching", method, spec.shape, dtype, device, runner(spec), budget, "sweep"))
            bar.update()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = run(args)
    print(f"results: {out_dir}")
    print((out_dir / "results.md").read_text())


if __name__ == "__main__":
    main()
