"""What a run shows and keeps: a live tqdm bar, ``metrics.jsonl`` (one JSON object a step), a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# bar label -> metrics key
_BAR_FIELDS = {"reward": "reward", "kl": "kl", "clip": "clip_frac", "ent": "entropy", "tok/s": "tokens_per_s"}


class MetricsLog:
    """Appends one JSON line per step to ``<out>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, resume_step: int = 0) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # on resume, drop lines of steps after the checkpoint (they are about to be redone)
            kept = (
                [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step] if resume_step else []
            )
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

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
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressBar:
    """tqdm bar over rollout steps showing the latest step's reward, KL, clip fraction, entropy, tokens/s."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.bar = tqdm(
            total=total, initial=initial, desc="rpg", unit="step", disable=not enabled, dynamic_ncols=True
        )

    def update(self, record: dict[str, Any]) -> None:
        shown = {}
        for label, key in _BAR_FIELDS.items():
            if key in record:
                value = record[key]
                shown[label] = f"{value:.0f}" if key == "tokens_per_s" else f"{value:.3g}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


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
