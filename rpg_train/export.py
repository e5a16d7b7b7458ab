"""The trained policy as a Hugging Face folder (``save_pretrained`` model + tokenizer), from a checkpoint.

    python -m rpg_train.export runs/tiny/checkpoints/step-00000100 runs/tiny/final --dtype float32
    python -m rpg_train --config runs/tiny/config.yaml --export   # the newest checkpoint -> out_dir/final/

A run writes ``out_dir/final/`` itself at its end (``train.export``). ``transformers``
(``AutoModelForCausalLM.from_pretrained``) and vLLM (``LLM(model=...)``) load the folder. Checkpoints of ddp
and fsdp runs export alike: DCP assembles the full tensors from the shards in one process (no process group,
no GPU; the fp32 weights once in CPU memory). The architecture and tokenizer come from the run's model folder,
which ``trainer.pt`` records (``--model-dir`` overrides it). ``dtype`` ``auto``: bfloat16 for a run trained
on CUDA, else float32.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import torch

from rpg_train import checkpoint
from rpg_train.config import EXPORT_DTYPES


def export_dtype(name: str, trained_on: str) -> torch.dtype:
    """``name`` (in ``EXPORT_DTYPES``) as a torch dtype for a run trained on device type ``trained_on``."""
    if name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {EXPORT_DTYPES}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if trained_on == "cuda" else torch.float32
    return getattr(torch, name)


def export_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    dtype: str = "auto",
    model_dir: str | Path | None = None,
) -> Path:
    """Write the policy of checkpoint ``checkpoint_path`` to the folder ``out`` (replaced atomically)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_path, out = Path(checkpoint_path), Path(out)
    trainer = checkpoint.read_trainer_state(checkpoint_path)
    model_dir = Path(model_dir if model_dir is not None else trainer["model_dir"])
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model_dir: {model_dir} holds no config.json; the export needs the run's model folder "
            "(pass --model-dir)"
        )
    torch_dtype = export_dtype(dtype, trainer.get("device_type", "cpu"))
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives tied parameters separate storage
    checkpoint.load_model_weights(checkpoint_path, model)
    model.to(torch_dtype)

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        shutil.rmtree(old)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpg_train.export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/tiny/checkpoints/step-00000100")
    parser.add_argument("out", help="the Hugging Face folder to write")
    parser.add_argument("--dtype", default="auto", choices=EXPORT_DTYPES)
    parser.add_argument("--model-dir", help="the run's model folder (default: the checkpoint's record)")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out, dtype=args.dtype, model_dir=args.model_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
