"""Write a run's results: ``results.json``, ``results.md`` (tables) and PNG plots.

python -m bench.report DIR     # redraw DIR/results.md and its plots from DIR/results.json
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

MIB = 2**20


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else format(value, pattern)


def status_text(row: dict) -> str:
    """``ok`` (with the method's note) or ``skipped: reason`` / ``error: reason``."""
    if row["status"] == "ok":
        return "ok" + (f" ({row['note']})" if row.get("note") else "")
    return f"{row['status']}: {row['reason']}".replace("|", "/")


def timed_table(rows: list[dict]) -> str:
    """Markdown table of a timed suite (loss, logprobs, matmul)."""
    lines = [
        "| method | shape | N | time ms (median) | min–max ms | peak mem MiB | TFLOP/s | × matmul | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        spread = f"{r['time_min_ms']:.1f}–{r['time_max_ms']:.1f}" if r["time_ms"] is not None else "—"
        peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / MIB
        tflops = r["tflops"]
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['n']} | {_fmt(r['time_ms'], '.1f')} | {spread} | "
            f"{_fmt(peak, '.0f')} | {_fmt(tflops, '.3g')} | {_fmt(r['ratio_to_matmul'], '.2f')} | "
            f"{status_text(r)} |"
        )
    return "\n".join(lines)


def long_context_table(rows: list[dict]) -> str:
    lines = [
        "| method | head (H, V) | budget GiB | max N that fits | peak mem MiB at max N | probes | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        max_n = "—" if r["status"] != "ok" else (f"≥ {r['max_n']} (cap)" if r["capped"] else str(r["max_n"]))
        peak = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / MIB
        lines.append(
            f"| {r['method']} | {r['shape']} ({r['h']}, {r['v']}) | {r['budget_bytes'] / 2**30:g} | "
            f"{max_n} | {_fmt(peak, '.0f')} | {len(r['probes'])} | {status_text(r)} |"
        )
    return "\n".join(lines)


TRAIN_SUITES = ("train-step", "train-step-fit", "micro-batching", "padding")  # bench.train_step's rows


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value / MIB:.0f}"


def train_step_table(rows: list[dict]) -> str:
    """One row per measured step: method, completion length, time, tokens/s, peak memory."""
    lines = [
        "| method | model | completion | tokens | time s (median) | tokens/s | peak MiB | within budget | "
        "probe | status |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        time_s = None if r["time_ms"] is None else r["time_ms"] / 1e3
        budget = "yes" if r["within_budget"] else "no"
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['n']} | {r['tokens'] or '—'} | {_fmt(time_s, '.2f')} | "
            f"{_fmt(r['tokens_per_s'], '.0f')} | {_mib(r['peak_mem_bytes'])} | {budget} | {r['probe']} | "
            f"{status_text(r)} |"
        )
    return "\n".join(lines)


def fit_text(row: dict) -> str:
    """The longest completion that fits, as a table cell: ``≥ N (cap)`` when the search never failed."""
    if row["status"] != "ok":
        return "—"
    return f"≥ {row['max_n']} (cap)" if row["capped"] else str(row["max_n"])


def train_step_fit_table(rows: list[dict]) -> str:
    lines = [
        "| method | model | budget GiB | longest completion that fits | peak MiB there | probes | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['shape']} | {r['budget_bytes'] / 2**30:g} | {fit_text(r)} | "
            f"{_mib(r['peak_mem_bytes'])} | {len(r['probes'])} | {status_text(r)} |"
        )
    return "\n".join(lines)


def micro_batching_table(rows: list[dict]) -> str:
    lines = [
        "| micro-batches | sequences | tokens | completion cap | micro-batches run | padding % | time s | "
        "tokens/s | peak MiB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        time_s = None if r["time_ms"] is None else r["time_ms"] / 1e3
        padding = r.get("padding_fraction")
        lines.append(
            f"| {r['method']} | {r.get('sequences', '—')} | {r['tokens'] or '—'} | {r['n']} | "
            f"{r.get('micro_batches', '—')} | {_fmt(None if padding is None else 100 * padding, '.1f')} | "
            f"{_fmt(time_s, '.2f')} | {_fmt(r['tokens_per_s'], '.0f')} | {_mib(r['peak_mem_bytes'])} | "
            f"{status_text(r)} |"
        )
    return "\n".join(lines)


def padding_table(rows: list[dict]) -> str:
    lines = [
        "| micro-batches | rows | completion cap | micro_batch_seqs / _tokens | micro-batches (mean) | "
        "padding % mean (min–max) |",
        "|---|---:|---:|---|---:|---|",
    ]
    for r in rows:
        size = (
            f"{r['micro_batch_tokens']} tokens"
            if r["micro_batch_tokens"]
            else f"{r['micro_batch_seqs']} seqs"
        )
        lines.append(
            f"| {r['method']} | {r['rows']} | {r['cap']} | {size} | {r['micro_batches']:.1f} | "
            f"{100 * r['padding_fraction']:.1f} ({100 * r['padding_min']:.1f}–{100 * r['padding_max']:.1f}) |"
        )
    return "\n".join(lines)


SUITE_TABLES = {
    "long-context": long_context_table,
    "train-step": train_step_table,
    "train-step-fit": train_step_fit_table,
    "micro-batching": micro_batching_table,
    "padding": padding_table,
}


def write_markdown(path: Path, meta: dict, rows: list[dict], plots: list[str]) -> None:
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_suite[row["suite"]].append(row)
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    out = [
        f"# Benchmark: {meta['device_name']}",
        "",
        f"`{meta['command']}` · {meta['date']} · commit `{meta['git_commit']}` · {meta['dtype']} · "
        f"{meta['threads']} threads",
        "",
        f"Versions: {versions}.",
        "",
        "Time: median of the timed repeats after warm-up (min–max beside it). Peak memory: above the "
        "inputs, in a fresh process per method and shape. TFLOP/s: loss 8·N·H·V, logprobs 2·N·H·V, "
        "bare matmul 6·N·H·V (fwd+bwd) or 2·N·H·V (fwd). × matmul: time over the bare LM-head matmul's "
        "at the same shape.",
        "",
    ]
    if any(r["suite"] in TRAIN_SUITES for r in rows):
        out += [
            "Train-step suites (`bench/train_step.py`): one optimizer step of a causal LM (forward with "
            "gradient checkpointing, loss, backward, clipping, AdamW); peak memory above the model, its "
            "AdamW states and the inputs; tokens/s = prompt + completion tokens per second of the median "
            "step; one fresh process per method and length.",
            "",
        ]
    for suite, suite_rows in by_suite.items():
        out += [f"## {suite}", ""]
        out += [SUITE_TABLES.get(suite, timed_table)(suite_rows), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plots] + [""]
    path.write_text("\n".join(out))


def plot_suites(out_dir: Path, rows: list[dict]) -> list[str]:
    """One PNG per (timed suite, head preset): time vs N and peak memory vs N, one line per method;
    one bar chart for the long-context suite. Returns the file names."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (`python -m bench.report DIR` draws them later)")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: list[str] = []
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        if row["suite"] not in ("long-context", *TRAIN_SUITES) and row["status"] == "ok":
            groups[(row["suite"], row["shape"])].append(row)
    for (suite, shape), group in groups.items():
        fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_method: dict[str, list[dict]] = defaultdict(list)
        for row in group:
            by_method[row["method"]].append(row)
        for method, points in by_method.items():
            points.sort(key=lambda r: r["n"])
            ns = [r["n"] for r in points]
            style = {"marker": "o", "linestyle": "--" if method == "matmul" else "-"}
            ax_time.plot(ns, [r["time_ms"] for r in points], label=method, **style)
            ax_mem.plot(ns, [max(r["peak_mem_bytes"], 1) / MIB for r in points], label=method, **style)
        h, v = group[0]["h"], group[0]["v"]
        for ax, ylabel in ((ax_time, "time per step (ms)"), (ax_mem, "peak memory above inputs (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.legend(fontsize=8)
        fig.suptitle(f"{suite}: {shape} head (H={h}, V={v}), {group[0]['dtype']}, {group[0]['device']}")
        fig.tight_layout()
        name = f"{suite}-{shape}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)

    long_rows = [r for r in rows if r["suite"] == "long-context"]
    if long_rows:
        fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(long_rows)))
        labels = [f"{r['method']} · {r['shape']}" for r in long_rows]
        values = [r["max_n"] if r["status"] == "ok" else 0 for r in long_rows]
        bars = ax.barh(labels, values)
        for bar, row in zip(bars, long_rows):
            text = (
                (f"≥{row['max_n']} (cap)" if row["capped"] else str(row["max_n"]))
                if row["status"] == "ok"
                else row["status"]
            )
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {text}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"largest N whose loss step fits {long_rows[0]['budget_bytes'] / 2**30:g} GiB")
        ax.set_title(f"long context ({long_rows[0]['dtype']}, {long_rows[0]['device']})")
        fig.tight_layout()
        fig.savefig(out_dir / "long-context.png", dpi=110)
        plt.close(fig)
        names.append("long-context.png")
    names += plot_train_step(out_dir, rows, plt)
    return names


def plot_train_step(out_dir: Path, rows: list[dict], plt) -> list[str]:
    """Per model of the train-step suite: peak memory (the budget dashed) and tokens/s against the completion
    length, one line per method; steps over the budget marked ``x`` at the budget."""
    names = []
    steps = [r for r in rows if r["suite"] == "train-step"]
    for model in dict.fromkeys(r["shape"] for r in steps):
        fig, (ax_mem, ax_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
        by_method: dict[str, list[dict]] = defaultdict(list)
        for row in steps:
            if row["shape"] == model:
                by_method[row["method"]].append(row)
        budget = None
        for method, points in by_method.items():
            points.sort(key=lambda r: r["n"])
            ok = [r for r in points if r["status"] == "ok" and r["peak_mem_bytes"] is not None]
            if not ok:
                continue
            (line,) = ax_mem.plot(
                [r["n"] for r in ok], [max(r["peak_mem_bytes"], 1) / MIB for r in ok], "o-", label=method
            )
            budget = ok[0]["budget_bytes"]
            over = [r for r in points if r.get("over_limit")]
            if over:
                ax_mem.plot(
                    [r["n"] for r in over], [budget / MIB] * len(over), "x", color=line.get_color(), ms=9
                )
            timed = [r for r in ok if r["tokens_per_s"]]
            ax_rate.plot([r["n"] for r in timed], [r["tokens_per_s"] for r in timed], "o-", label=method)
        if budget:
            ax_mem.axhline(budget / MIB, linestyle="--", color="gray", label=f"budget {budget / 2**30:g} GiB")
        for ax, ylabel in ((ax_mem, "peak memory above model + AdamW (MiB)"), (ax_rate, "tokens / s")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("completion tokens (+ prompt)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_mem.legend(fontsize=8)
        first = next(iter(by_method.values()))[0]
        fig.suptitle(
            f"train step: {model} (H={first['h']}, V={first['v']}, {first['layers']} layers), "
            f"{first['dtype']}, {first['device']}"
        )
        fig.tight_layout()
        name = f"train-step-{model}.png"
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def render(folder: Path) -> list[str]:
    """Rewrite ``folder/results.md`` and its plots from ``folder/results.json``; return the plot names."""
    data = json.loads((folder / "results.json").read_text())
    plots = plot_suites(folder, data["rows"])
    write_markdown(folder / "results.md", data["meta"], data["rows"], plots)
    return plots


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.report", description=render.__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="run folders holding a results.json")
    for folder in parser.parse_args(argv).folders:
        plots = render(folder)
        print(f"{folder}: results.md, {', '.join(plots) or 'no plots'}")


if __name__ == "__main__":
    main()
