"""Command line: ``python -m rpg_train --preset tiny`` (or ``torchrun --nproc_per_node=K -m rpg_train ...``).

Examples::

    python -m rpg_train --preset tiny
    python -m rpg_train --preset tiny --set train.seed=1 --out runs/tiny-s1
    python -m rpg_train --preset rpg --set model.path=/models/Qwen2.5-Math-7B \\
        --set data.train_file=/data/dapo-math-17k.parquet --set data.eval_file=/data/aime24.jsonl
    python -m rpg_train --config runs/tiny/config.yaml --resume
    python -m rpg_train --preset tiny --overwrite       # replace the run in runs/tiny
    python -m rpg_train --config runs/tiny/config.yaml --export   # newest checkpoint -> runs/tiny/final/
    torchrun --nproc_per_node=2 -m rpg_train --preset tiny --set train.parallel=fsdp

Exit status: 0 done; 2 a configuration error (one line on stderr) or a diverged run; 130 / 143 stopped by
SIGINT / SIGTERM, with a checkpoint to --resume from (the message says where).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from rpg_train.config import PRESETS, Config, ConfigError, build_config

PROG = "python -m rpg_train"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named base configuration")
    parser.add_argument("--config", help="YAML file (same layout as the saved config.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one field, e.g. --set optim.lr=1e-5 (repeatable)",
    )
    parser.add_argument("--out", help="output folder (train.out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints, metrics and final/ of the run already in --out, then start anew",
    )
    parser.add_argument(
        "--export",
        action="store_true",
        help="write the newest checkpoint in --out as a Hugging Face folder <out>/final/ and exit",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    if args.preset is None and args.config is None:
        parser.error("give --preset NAME or --config FILE.yaml (try --preset tiny)")
    return args


def export_latest(cfg: Config) -> int:
    """``--export``: the newest complete checkpoint of ``train.out_dir`` -> ``<out_dir>/final/``."""
    from rpg_train import checkpoint
    from rpg_train.export import export_checkpoint

    latest = checkpoint.latest_checkpoint(cfg.train.out_dir)
    if latest is None:
        print(
            f"rpg_train --export: no checkpoint under {checkpoint.checkpoint_dir(cfg.train.out_dir)}",
            file=sys.stderr,
        )
        return 1
    if int(os.environ.get("RANK", "0")) == 0:  # one writer, also under torchrun
        print(export_checkpoint(latest, Path(cfg.train.out_dir) / "final", dtype=cfg.train.export_dtype))
    return 0


def config_error(message: str) -> int:
    """argparse's way: one line on stderr, exit status 2."""
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # --out is a path, never YAML: quoted (a JSON string is a YAML scalar)
    overrides = list(args.overrides) + ([f"train.out_dir={json.dumps(args.out)}"] if args.out else [])
    try:
        cfg = build_config(args.preset, args.config, overrides)
    except ConfigError as err:
        return config_error(str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        print(cfg.to_yaml(), end="", flush=True)
    if args.print_config:
        return 0
    if args.export:
        return export_latest(cfg)
    import torch

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # keep the progress bar readable (per-sync logs)

    if not torch.cuda.is_available():  # vLLM on CPU: engine in this process, small KV cache (unless set)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from rpg_train.interrupt import Interrupted, StepAbandoned
    from rpg_train.train import TrainingDiverged, train

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except ConfigError as err:  # found at start-up (the folder, the prompts, a path): before any training
        return config_error(str(err))
    except TrainingDiverged as err:
        print(f"rpg_train: stopped: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:  # the message, with the checkpoint, is printed already
        return err.exit_code
    except StepAbandoned as err:  # outside the steps (loading, export): nothing new to checkpoint
        print(f"rpg_train: {signal.Signals(err.signum).name}: stopped; the checkpoints are as they were")
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
