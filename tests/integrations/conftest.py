"""Tiny randomly initialised causal LMs built from configs (no hub download)."""

import pytest
import torch
import transformers

TINY = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def tiny_causal_lm(
    family: str, *, tie_word_embeddings: bool = False, seed: int = 0
) -> transformers.PreTrainedModel:
    """A float32 ``*ForCausalLM`` of the given family ("qwen2", "llama", "qwen3") in eval mode."""
    config_cls = {
        "qwen2": transformers.Qwen2Config,
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
    }[family]
    extra = {"head_dim": 8} if family == "qwen3" else {}
    config = config_cls(**TINY, **extra, tie_word_embeddings=tie_word_embeddings, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random, non-trivial weights everywhere (incl. the norms)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


@pytest.fixture
def make_tiny_lm():
    return tiny_causal_lm
