"""What a run shows and keeps: a live tqdm bar or one line per step, ``metrics.jsonl`` (one JSON object a
step), TensorBoard or Weights & Biases (``train.report_to``), a PNG plot and the summary."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# bar label -> metrics key
_BAR_FIELDS = {"reward": "reward", "kl": "kl", "clip": "clip_frac", "ent": "entropy", "tok/s": "tokens_per_s"}
# the one-line step log: label -> metrics key, in this order (those a step has)
_LINE_FIELDS = {
    "reward": "reward",
    "acc": "accuracy",
    "eval": "eval_accuracy",
    "kl": "kl",
    "clip": "clip_frac",
    "ent": "entropy",
    "loss": "loss",
    "gnorm": "grad_norm",
    "mismatch_kl": "mismatch_kl",
    "len": "response_length",
    "tok/s": "tokens_per_s",
    "s": "step_s",
}


def warn(message: str) -> None:
    """A warning of the run, on stderr (rank 0 calls it)."""
    print(f"rpg_train: warning: {message}", file=sys.stderr, flush=True)


class MetricsLog:
    """Appends one JSON line per step to ``<out>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # on resume, drop lines of steps after the checkpoint (they are about to be redone) and any
            # torn line; the file is replaced in one rename, so a crash now leaves it whole
            kept = (
                [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            )
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that is not a JSON object (a write torn by a crash) is
    dropped with a warning naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warn(
                f"{path}: line {number} is not a JSON record (a write torn by a crash?), dropped: "
                f"{line[:60]!r}"
            )
            continue
        records.append(record)
    return records


def _format(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.0f}" if key == "tokens_per_s" else f"{value:.3g}"


class ProgressBar:
    """What a run prints per rollout step (rank 0): a tqdm bar (with ``bar`` and stderr a terminal) showing
    the latest reward, KL, clip fraction, entropy and tokens/s, and one plain line every ``log_every`` steps
    where the bar is not seen (without the bar, or when stdout is not a terminal: a log file)."""

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, *, bar: bool = True, log_every: int = 1
    ) -> None:
        show_bar = enabled and bar and sys.stderr.isatty()
        self.total = total
        self.bar = tqdm(
            total=total, initial=initial, desc="rpg", unit="step", disable=not show_bar, dynamic_ncols=True
        )
        self.log_every = log_every if enabled and (not show_bar or not sys.stdout.isatty()) else 0

    def update(self, record: dict[str, Any]) -> None:
        shown = {label: _format(key, record[key]) for label, key in _BAR_FIELDS.items() if key in record}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)
        step = record.get("step", 0)
        if self.log_every and (step % self.log_every == 0 or step == self.total):
            fields = [
                f"{label} {_format(key, record[key])}" for label, key in _LINE_FIELDS.items() if key in record
            ]
            self.write(f"step {step}/{self.total} | " + " | ".join(fields))

    def write(self, text: str) -> None:
        self.bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()


class Reporter:
    """``train.report_to``: every numeric metric of a step to TensorBoard (``<out>/tensorboard/``) or
    Weights & Biases (``<out>/wandb/``; ``WANDB_MODE=offline`` writes there without any network, for a
    later ``wandb sync``), or nowhere (``none``). Rank 0 only."""

    def __init__(
        self,
        kind: str,
        out_dir: str | Path,
        *,
        enabled: bool = True,
        config: dict[str, Any] | None = None,
        resume_step: int = 0,
        project: str = "rpg_train",
    ) -> None:
        self.kind = kind if enabled else "none"
        self.writer: Any = None
        out_dir = Path(out_dir)
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events of the steps it redoes
            self.writer = SummaryWriter(
                out_dir / "tensorboard", purge_step=resume_step + 1 if resume_step else None
            )
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError as err:
                hint = "pip install 'rpg-kernels[wandb]'"
                raise ImportError(f"train.report_to=wandb needs wandb: {hint}") from err

            id_file = out_dir / "wandb-run-id"  # a resumed run continues the same W&B run
            run_id = (
                id_file.read_text().strip() if resume_step and id_file.is_file() else secrets.token_hex(4)
            )
            id_file.write_text(run_id)
            self.writer = wandb.init(
                project=project, dir=str(out_dir), id=run_id, resume="allow", name=out_dir.name, config=config
            )

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        values = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if self.kind == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()  # a crash keeps every finished step's scalars
        elif self.kind == "wandb":
            self.writer.log(values, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        elif self.kind == "wandb":
            self.writer.finish()
        self.kind = "none"


def check_reporter(kind: str) -> None:
    """The package ``train.report_to`` needs is importable (checked before anything loads)."""
    from rpg_train.config import ConfigError

    needs = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(kind)
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"train.report_to={kind} needs the {needs} package: pip install {needs}")


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Reward (and eval accuracy) vs step and KL vs step, side by side, saved as a PNG."""
    steps = [r["step"] for r in records if "reward" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_reward, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    ax_reward.plot(steps, [r["reward"] for r in records if "reward" in r], label="train reward", alpha=0.8)
    evals = [(r["step"], r["eval_accuracy"]) for r in records if "eval_accuracy" in r]
    if evals:
        ax_reward.plot(*zip(*evals), "o-", label="eval accuracy (mean@k)")
    ax_reward.set_xlabel("step")
    ax_reward.set_ylabel("reward / accuracy")
    ax_reward.legend()
    ax_reward.grid(alpha=0.3)
    kls = [(r["step"], r["kl"]) for r in records if isinstance(r.get("kl"), (int, float))]
    if kls:
        ax_kl.plot(*zip(*kls), color="tab:red")
    ax_kl.set_xlabel("step")
    ax_kl.set_ylabel("token KL (loss regulariser)")
    ax_kl.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarize(records: list[dict[str, Any]], fraction: float = 0.1) -> dict[str, float]:
    """Mean train reward over the first and the last ``fraction`` of steps, and their difference."""
    rewards = [r["reward"] for r in records if "reward" in r]
    if not rewards:
        return {}
    k = max(1, round(len(rewards) * fraction))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    out = {
        "steps": float(len(rewards)),
        "reward_first": first,
        "reward_last": last,
        "reward_gain": last - first,
    }
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    if evals:
        out["eval_accuracy_first"], out["eval_accuracy_last"] = evals[0], evals[-1]
    return out
