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


def tiny_tokenizer():
    """A whitespace word-level tokenizer over 61 tokens: [PAD], [EOS], [UNK], digits, a-z and a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]", *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
    words += [f"w{i}" for i in range(TINY["vocab_size"] - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved tiny Qwen2 + tokenizer (TRL loads policy and reference model from a path)."""
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("qwen2", seed=11)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path = tmp_path / "tiny-qwen2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
