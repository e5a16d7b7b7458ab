"""Fixtures: tiny causal LMs (`tests.support`), a tiny tokenizer, and both saved as a model directory."""

import pytest

from tests.support import TINY_LM, tiny_causal_lm


@pytest.fixture
def make_tiny_lm():
    return tiny_causal_lm


def tiny_tokenizer():
    """A whitespace word-level tokenizer over 61 tokens: [PAD], [EOS], [UNK], digits, a-z and a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]", *"0123456789", *"abcdefghijklmnopqrstuvwxyz"]
    words += [f"w{i}" for i in range(TINY_LM["vocab_size"] - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


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
