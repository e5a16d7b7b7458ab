"""Runs every Python block of docs/INTEGRATIONS.md on a tiny random model (CPU)."""

import math
import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[2] / "docs" / "INTEGRATIONS.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _rollout_tensors(vocab, batch=4, prompt_len=5, completion_len=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(batch, prompt_len, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left-padded prompt
    completion_mask = torch.ones(batch, completion_len, dtype=torch.long)
    completion_mask[1, 4:] = 0  # right-padded completion
    return dict(
        prompt_ids=torch.randint(0, vocab, (batch, prompt_len), generator=gen),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(0, vocab, (batch, completion_len), generator=gen),
        completion_mask=completion_mask,
        old_logprobs=-torch.rand(batch, completion_len, generator=gen) * 4 - 0.1,
        advantages=torch.randn(batch, generator=gen),
    )


def test_doc_has_the_three_examples():
    blocks = _python_blocks()
    assert len(blocks) == 3
    assert "completion_hidden_states" in blocks[0] and "RPGGRPOTrainer" in blocks[1]
    assert "POLICY_LOSSES" in blocks[2]


def test_hf_example_runs(make_tiny_lm):
    model = make_tiny_lm("qwen2")
    namespace = {"model": model, **_rollout_tensors(model.config.vocab_size)}
    exec(_python_blocks()[0], namespace)
    assert math.isfinite(namespace["loss"].item())
    assert model.lm_head.weight.grad is not None and model.model.layers[0].mlp.up_proj.weight.grad is not None


def test_verl_example_runs():
    namespace = _rollout_tensors(61)
    namespace["logprobs"] = (namespace["old_logprobs"] + 0.1).requires_grad_(True)
    exec(_python_blocks()[2], namespace)
    namespace["pg_loss"].backward()
    assert math.isfinite(namespace["pg_loss"].item()) and "actor/pg_clipfrac" in namespace["pg_metrics"]


def test_trl_example_runs(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from datasets import Dataset

    import rpg_kernels.integrations.trl as rk_trl

    config_cls = rk_trl.RPGGRPOConfig

    def small_cpu_config(**kwargs):  # the doc's settings, shrunk to one CPU step
        kwargs.update(
            output_dir=str(tmp_path / "out"),
            max_completion_length=6,
            max_steps=1,
            per_device_train_batch_size=4,
            use_cpu=True,
            bf16=False,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
        )
        return config_cls(**kwargs)

    monkeypatch.setattr(rk_trl, "RPGGRPOConfig", small_cpu_config)
    namespace = {
        "model_path": tiny_model_dir,
        "reward_fn": lambda completions, **kw: [float(len(c.split())) for c in completions],
        "dataset": Dataset.from_dict({"prompt": ["a b", "c d e", "f", "g h"]}),
    }
    exec(_python_blocks()[1], namespace)
    logged = [entry for entry in namespace["trainer"].state.log_history if "rpg/kl" in entry]
    assert logged and math.isfinite(logged[0]["loss"])
