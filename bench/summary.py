"""``python -m bench.summary DIR [--work WORK]``: the one-page summary of a ``.ci/gpu-check`` run.

Reads what the check left in ``DIR`` (``results.json`` of the loss benchmark, ``phases.json``,
``gpu_realistic_*.json``) and in ``WORK`` (``steps.tsv``: one line per step, and the steps' pytest
``<slug>.xml`` JUnit reports), writes ``DIR/summary.md`` and prints it: the steps, the issue's targets
measured against the numbers of this run, the realistic accuracy test, the phases, the benchmark table,
and the folder name to commit the run under. Every number comes from those files.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from bench.readme import device_class
from bench.report import MIB, timed_table

LIGER = "liger-chunked"  # LigerFusedLinearGRPOLoss, the peer the speed-up target names


@dataclass(frozen=True)
class Targets:
    """Issue 12's targets for one device class, at one shape and dtype."""

    shape: tuple[int, int, int]  # (N, H, V)
    dtype: str
    max_ratio_to_matmul: float
    min_speedup_over_liger: float | None = None
    memory_slack_bytes: int | None = None  # peak above the inputs <= gradients + workspace + this


TARGETS = {
    "GPU": Targets((16384, 4096, 151936), "bfloat16", 1.2, 2.5, 256 * MIB),
    "CPU": Targets((8192, 512, 32768), "float32", 1.25),
}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def read_steps(work: Path | None) -> list[dict]:
    """``steps.tsv`` rows (slug, name, limit s, exit code or "not run", seconds) with their JUnit counts."""
    if work is None or not (work / "steps.tsv").exists():
        return []
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines():
        slug, name, limit, rc, took = line.split("\t")
        steps.append(
            {"slug": slug, "name": name, "limit": limit, "rc": rc, "took": took, **junit(work, slug)}
        )
    return steps


def junit(work: Path, slug: str) -> dict:
    """``{"tests": "N passed, ...", "failures": [test: message, ...]}`` from ``work/<slug>.xml``."""
    path = work / f"{slug}.xml"
    if not path.exists():
        return {"tests": "", "failures": []}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    parts = [f"{passed} passed"] + [f"{count[k]} {k}" for k in ("failures", "errors", "skipped") if count[k]]
    failures = []
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").strip().splitlines()
            failures.append(f"{case.get('classname')}::{case.get('name')}: {message[0] if message else ''}")
    return {"tests": ", ".join(parts), "failures": failures}


def loss_rows(results: dict | None) -> list[dict]:
    return [r for r in (results or {}).get("rows", []) if r["suite"] == "loss"]


def target_shape_rows(rows: list[dict], targets: Targets) -> tuple[list[dict], str]:
    """The loss rows at the target shape, else at the largest N measured (and a note saying so)."""
    n, h, v = targets.shape
    at_target = [r for r in rows if (r["n"], r["h"], r["v"]) == (n, h, v) and r["dtype"] == targets.dtype]
    if at_target or not rows:
        return at_target, ""
    largest = max(rows, key=lambda r: r["n"] * r["h"] * r["v"])
    shape = (largest["n"], largest["h"], largest["v"])
    picked = [r for r in rows if (r["n"], r["h"], r["v"]) == shape]
    return picked, f" (not the target shape: N={shape[0]}, H={shape[1]}, V={shape[2]}, {largest['dtype']})"


def evaluate_targets(results: dict | None) -> list[tuple[str, str, str]]:
    """``(target, measured, verdict)`` rows; verdict ``met``, ``NOT MET`` or ``not measured``."""
    if results is None:
        return [("loss benchmark", "no results.json", "not measured")]
    targets = TARGETS[device_class(results["meta"]["device_name"])]
    rows, note = target_shape_rows(loss_rows(results), targets)
    ok = {r["method"]: r for r in rows if r["status"] == "ok"}
    ours, matmul, liger = ok.get("ours"), ok.get("matmul"), ok.get(LIGER)
    n, h, v = targets.shape
    out = []

    def add(name: str, measured: str | None, good: bool, *needed: str) -> None:
        if measured is None:
            out.append((name, _missing(rows, *needed), "not measured"))
        else:
            out.append((name, measured + note, "met" if good else "NOT MET"))

    name = (
        f"ours ≤ {targets.max_ratio_to_matmul} × the bare matmul (loss, {targets.dtype}, N={n}, H={h}, V={v})"
    )
    ratio = ours["time_ms"] / matmul["time_ms"] if ours and matmul else None
    measured = (
        None if ratio is None else f"{ratio:.2f} × ({ours['time_ms']:.1f} vs {matmul['time_ms']:.1f} ms)"
    )
    add(name, measured, ratio is not None and ratio <= targets.max_ratio_to_matmul, "ours", "matmul")
    if targets.min_speedup_over_liger is not None:
        name = f"ours ≥ {targets.min_speedup_over_liger} × faster than LigerFusedLinearGRPOLoss (`{LIGER}`)"
        speedup = liger["time_ms"] / ours["time_ms"] if ours and liger else None
        measured = None
        if speedup is not None:
            measured = f"{speedup:.2f} × ({liger['time_ms']:.1f} vs {ours['time_ms']:.1f} ms)"
        add(name, measured, speedup is not None and speedup >= targets.min_speedup_over_liger, "ours", LIGER)
    if targets.memory_slack_bytes is not None:
        from rpg_kernels.ops.lm_head import DEFAULT_WORKSPACE_BYTES

        name = "ours: peak ≤ inputs + gradients + workspace + 256 MiB"
        peak = ours.get("peak_mem_bytes") if ours else None
        measured, limit = None, 0
        if peak is not None:
            itemsize = 2 if ours["dtype"] in ("bfloat16", "float16") else 4
            grads = (ours["n"] + ours["v"]) * ours["h"] * itemsize
            limit = grads + DEFAULT_WORKSPACE_BYTES + targets.memory_slack_bytes
            measured = (
                f"{peak / MIB:.0f} MiB above the inputs vs {limit / MIB:.0f} MiB (gradients "
                f"{grads / MIB:.0f} + workspace {DEFAULT_WORKSPACE_BYTES / MIB:.0f} + "
                f"{targets.memory_slack_bytes / MIB:.0f})"
            )
        add(name, measured, peak is not None and peak <= limit, "ours")
    return out


def _missing(rows: list[dict], *methods: str) -> str:
    """Why a target could not be read: each method's status and reason, or that it did not run."""
    by_method = {r["method"]: r for r in rows}
    parts = []
    for m in methods:
        row = by_method.get(m)
        if row is None:
            parts.append(f"{m}: not run")
        elif row["status"] != "ok":
            parts.append(f"{m}: {row['status']}: {row['reason']}")
    return "; ".join(parts).replace("|", "/") or "—"


def realistic_table(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("gpu_realistic_*.json")):
        data = json.loads(path.read_text())
        lines += [
            f"{data['device']}, N={data['shape']['N']}, H={data['shape']['H']}, V={data['shape']['V']}, "
            f"bf16 vs an fp32 reference, tolerance {data['tolerance']:g} (`{path.name}`):",
            "",
            "| run | passed | worst relative error | loss step ms | log-probs ms | peak MiB "
            "| ≤ memory target (MiB) |",
            "|---|---|---|---:|---:|---:|---|",
        ]
        for key, run in data["runs"].items():
            worst = max(run["rel_errors"], key=run["rel_errors"].get)
            peak, target = run["loss_step_peak_bytes"] / MIB, run["memory_target_bytes"] / MIB
            lines.append(
                f"| {key} | {'yes' if run['passed'] else 'NO'} | {run['rel_errors'][worst]:.2e} ({worst}) | "
                f"{run['loss_step_ms']:.1f} | {run['logprobs_ms']:.1f} | {peak:.0f} | "
                f"{'yes' if run['within_memory_target'] else 'no'} ({target:.0f}) |"
            )
        lines.append("")
    return lines or ["No realistic-test results (the test did not run, or was skipped without CUDA).", ""]


def phases_table(phases: dict | None) -> list[str]:
    if phases is None:
        return ["No phases.json.", ""]
    matmul = phases["matmul"]["time_ms"]
    lines = [
        f"Median ms per loss step; bare matmul fwd+bwd {matmul:.2f} ms (full tables: `phases.md`).",
        "",
        "| path | phases (ms) | sum | end to end | × matmul | replay = public call |",
        "|---|---|---:|---:|---:|---|",
    ]
    for p in phases["paths"]:
        if p["status"] != "ok":
            lines.append(f"| {p['path']} | {p['status']}: {p['reason']} | | | | |")
            continue
        parts = " · ".join(f"{ph['phase']} {ph['time_ms']:.2f}" for ph in p["phases"])
        e2e = p["end_to_end_ms"]
        consistent = "yes" if p["consistent"] else f"NO ({p['grad_rel_diff']:.1e})"
        lines.append(
            f"| {p['path']} | {parts} | {p['sum_ms']:.2f} | {e2e:.2f} | {e2e / matmul:.2f} | {consistent} |"
        )
    return [*lines, ""]


def commit_folder(results: dict | None, phases: dict | None) -> str:
    """``bench/results/<device>-<date>/`` as `python -m bench` names its folders."""
    from bench.__main__ import slug

    meta = (results or phases or {}).get("meta")
    if meta is None:
        return "bench/results/<gpu>-<date>/"
    return f"bench/results/{slug(meta['device_name'].split(',')[0])}-{meta['date'][:10]}/"


def render(folder: Path, work: Path | None = None) -> str:
    results, phases = _load(folder / "results.json"), _load(folder / "phases.json")
    meta = (results or phases or {}).get("meta", {})
    title = f"{meta.get('device_name', 'unknown device')}, {meta.get('date', '')[:10]}"
    out = [
        f"# GPU check: {title}, commit `{meta.get('git_commit', 'unknown')}`",
        "",
        f"Commit this folder as `{commit_folder(results, phases)}`, then run `python -m bench.readme`.",
        "",
    ]
    steps = read_steps(work)
    if steps:
        out += ["## Steps", "", "| step | limit s | took s | exit | tests |", "|---|---:|---:|---|---|"]
        for s in steps:
            exit_text = {"0": "ok", "124": "124 (time limit)"}.get(s["rc"], s["rc"])
            out.append(f"| {s['name']} | {s['limit']} | {s['took']} | {exit_text} | {s['tests']} |")
        failures = [f for s in steps for f in s["failures"]]
        if failures:
            out += ["", "Failed tests:", ""] + [f"- `{f}`"[:300] for f in failures[:30]]
        out.append("")
    out += ["## Targets (issue 12)", "", "| target | measured | verdict |", "|---|---|---|"]
    out += [f"| {t} | {m} | {v} |" for t, m, v in evaluate_targets(results)]
    out += ["", "## Realistic bf16 accuracy", "", *realistic_table(folder)]
    out += ["## Phases", "", *phases_table(phases)]
    out += ["## Loss benchmark", ""]
    rows = loss_rows(results)
    out += [timed_table(rows) if rows else "No loss benchmark rows.", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.summary", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the check's output folder")
    parser.add_argument("--work", type=Path, default=None, help="folder with steps.tsv and <step>.xml")
    args = parser.parse_args(argv)
    text = render(args.folder, args.work)
    (args.folder / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
