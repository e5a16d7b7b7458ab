"""docs/TRAINING.md's commands run as written: every ``python -m rpg_train`` / ``torchrun ... -m rpg_train``
command of its ``bash`` blocks and every inline ``--set`` example, at tiny scale (the tiny preset, a step or
a few, the ``hf`` engine) or, where a GPU and a real model are needed, through the full validation
(``--print-config``)."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import torch

from rpg_train.__main__ import main
from rpg_train.config import ConfigError, build_config
from tests.train.runs import FAST

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "TRAINING.md"
STAND_INS = {"model.path": "/models/m", "data.train_file": "/data/d.parquet"}


def with_paths(argv: list[str]) -> list[str]:
    """``argv`` with stand-in model/data paths where "..." elided them (validation does not read them)."""
    given = {a.split("=", 1)[0] for a in argv}
    return argv + [
        a for key, path in STAND_INS.items() if key not in given for a in ("--set", f"{key}={path}")
    ]


def doc_commands() -> list[tuple[str, dict[str, str], list[str]]]:
    """``(line, environment, argv after -m rpg_train)`` of each command in the bash blocks, in order."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            env = {}
            while tokens and re.match(r"^[A-Z_]+=", tokens[0]):
                key, value = tokens.pop(0).split("=", 1)
                env[key] = value
            if (
                "-m" in tokens
                and tokens.index("-m") + 1 < len(tokens)
                and tokens[tokens.index("-m") + 1] == "rpg_train"
            ):
                argv = [t for t in tokens[tokens.index("-m") + 2 :] if t != "..."]  # "..." elides the paths
                found.append((" ".join(line.split()), env, argv))
    return found


def doc_set_examples() -> list[list[str]]:
    """The inline ``--set ...`` examples of the prose (a backticked span may wrap across lines), but the
    syntax itself (``--set section.key=value``)."""
    spans = re.findall(r"`(--set\s[^`]+)`", DOC.read_text())
    return [shlex.split(" ".join(span.split())) for span in spans if "section.key=value" not in span]


def tiny_argv(argv: list[str]) -> list[str]:
    """``argv`` at tiny scale: the FAST settings first (the command's own win), one step unless it says."""
    steps = [] if any(a.startswith("train.steps=") for a in argv) else ["--set", "train.steps=1"]
    fast = [arg for setting in FAST for arg in ("--set", setting)]
    rest = [a for i, a in enumerate(argv) if a != "--preset" and (i == 0 or argv[i - 1] != "--preset")]
    return ["--preset", "tiny", *fast, *steps, *rest]


@pytest.mark.timeout(600)
def test_every_command_runs_at_tiny_scale_or_validates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their runs/... folders land here
    monkeypatch.setenv("WANDB_SILENT", "true")
    commands = doc_commands()
    assert len(commands) >= 12, "the bash blocks' commands were not found"
    ran, validated, skipped = [], [], []
    for line, env, argv in commands:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if "--config" in argv:  # a GPU run's own folder (runs/rpg-qwen7b/config.yaml): not here
            skipped.append(line)
        elif argv[argv.index("--preset") + 1] == "tiny":
            assert main(tiny_argv(argv)) == 0, line
            ran.append(line)
        else:
            assert main([*with_paths(argv), "--print-config"]) == 0, line
            validated.append(line)
    assert len(ran) >= 8 and len(validated) >= 6, (ran, validated)
    assert all("--config runs/rpg-qwen7b/config.yaml" in line for line in skipped), skipped


@pytest.mark.timeout(300)
def test_every_inline_set_example_runs_at_tiny_scale_or_validates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    examples = doc_set_examples()
    assert len(examples) >= 4, examples
    assert ["--set", "algo.loss_overrides={kl: fkl, beta: 1e-3}"] in examples  # issue 16 found it broken
    for example in examples:
        overrides = example[1::2]
        assert main(with_paths(["--preset", "rpg", *example]) + ["--print-config"]) == 0, example
        try:  # also trained on, where the tiny preset allows it (fsdp_offload needs fsdp, say)
            build_config("tiny", overrides=overrides)
        except ConfigError:
            continue
        argv = [*tiny_argv(example), "--out", f"runs/{len(overrides)}-{abs(hash(tuple(example)))}"]
        if any(o.startswith("model.attn_implementation=flash") for o in overrides) and not has_flash_attn():
            capsys.readouterr()
            assert main(argv) == 2, example  # refused at load time, naming the field
            assert "model.attn_implementation=flash" in capsys.readouterr().err
            continue
        assert main(argv) == 0, example


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
