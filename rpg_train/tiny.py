"""The embedded default: a tiny Qwen2 model, its tokenizer and a verifiable task, all built offline.

The task asks for one digit, the larger of two:

    prompt "3max8="  ->  answer "8"

with operands 0-9 (``operations=`` adds "min", and (a+b) or (a-b) mod 10). A completion is the answer
digit followed by the end-of-sequence token, so two new tokens suffice (``max_tokens=2``). The reward is
``exact_match`` (see ``rewards.py``): 1 for exactly the answer, 1/2 for the right digit followed by one
more token, 0 otherwise.

Chance level: a randomly initialised model samples close to uniformly over the 18-token vocabulary, so
its mean reward is about 0.03 (right digit 1/18, then credit 1 or 1/2); a policy that has learnt the task
scores 1. The answer is always one of the prompt's digits, so a transformer with tied embeddings can learn
it from reward alone (attend to the larger operand, copy it).

Learnability check (plain REINFORCE, group-mean baseline, no SFT, AdamW, 32 prompts x 8 samples per step,
``max_tokens=2``, vLLM CPU rollouts synced every step, 2 shared CPU cores): with lr 1e-3, mean reward of the
first 10% of 100 steps 0.10-0.15, of the last 10% 0.83-0.95 (seeds 0, 1, 2; 3-4 minutes each). With lr 3e-3
it rose as fast but plateaued near 0.67 and dipped late. Mixing "max" and "min" learnt more slowly (the same
loop, 300 steps: last-10% reward 0.32 and 0.44, answer-digit accuracy 0.5-0.65), so the default is "max".

Everything is deterministic given ``seed``: the model weights, the train/eval split and the file contents.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

PAD_TOKEN, UNK_TOKEN, EOS_TOKEN = "<pad>", "<unk>", "<eos>"
RESERVED_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN)
DIGITS = tuple(str(d) for d in range(10))

# Each operation maps two digits to one digit.
OPERATIONS: dict[str, Callable[[int, int], int]] = {
    "max": max,
    "min": min,
    "+": lambda a, b: (a + b) % 10,
    "-": lambda a, b: (a - b) % 10,
}
DEFAULT_OPERATIONS = ("max",)
WORD_OPERATIONS = tuple(op for op in OPERATIONS if op.isalpha())
VOCAB = (*RESERVED_TOKENS, *DIGITS, *(op for op in OPERATIONS if not op.isalpha()), "=", *WORD_OPERATIONS)
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer): single digits, letter runs, symbol runs.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

TINY_REWARD = "exact_match"
TINY_MAX_TOKENS = 2  # the answer digit + end of sequence
TINY_MAX_MODEL_LEN = 64


@dataclass(frozen=True)
class TinyAssets:
    """Paths of the generated tiny assets and the settings the task needs."""

    model_dir: Path  # save_pretrained Qwen2ForCausalLM + tokenizer (transformers and vLLM load it)
    train_file: Path  # JSONL rows {"prompt": str, "answer": str}
    eval_file: Path  # JSONL, prompts held out from train_file
    reward_name: str = TINY_REWARD
    max_tokens: int = TINY_MAX_TOKENS
    max_model_len: int = TINY_MAX_MODEL_LEN


def task_rows(operations: Sequence[str] = DEFAULT_OPERATIONS) -> list[dict[str, str]]:
    """Every prompt of the task once, in a fixed order: ``{"prompt": "3max8=", "answer": "8"}``."""
    unknown = [op for op in operations if op not in OPERATIONS]
    if unknown or not operations:
        raise ValueError(
            f"operations must be a non-empty subset of {sorted(OPERATIONS)}, got {list(operations)}"
        )
    return [
        {"prompt": f"{a}{op}{b}=", "answer": str(OPERATIONS[op](a, b))}
        for op in operations
        for a in range(10)
        for b in range(10)
    ]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE ``PreTrainedTokenizerFast`` over ``VOCAB`` in Qwen2's layout; no BOS.

    transformers' ``AutoTokenizer`` (and so vLLM) rebuilds any tokenizer saved beside a Qwen2 config as a
    ``Qwen2Tokenizer`` (byte-level BPE with Qwen2's pre-tokenizer regex), so the tokenizer is built in that
    form: digits and symbols are single-character BPE tokens (no merges), the operation words are added
    tokens, and whitespace is not in the vocabulary (it is dropped). Task text is therefore written
    without spaces, and ``decode(encode(text)) == text`` for every prompt and answer.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bpe_vocab = [word for word in VOCAB if word not in WORD_OPERATIONS]
    tokenizer = Tokenizer(
        BPE(
            vocab={word: i for i, word in enumerate(bpe_vocab)},
            merges=[],
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in RESERVED_TOKENS])
    tokenizer.add_tokens([AddedToken(word, normalized=False) for word in WORD_OPERATIONS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        model_max_length=TINY_MAX_MODEL_LEN,
        clean_up_tokenization_spaces=False,
    )
    if [fast.convert_tokens_to_ids(word) for word in VOCAB] != list(range(len(VOCAB))):
        raise AssertionError("tokenizer ids must follow VOCAB order")
    return fast


def build_model(
    seed: int = 0, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2
) -> Qwen2ForCausalLM:
    """A randomly initialised fp32 ``Qwen2ForCausalLM`` over ``VOCAB`` (tied embeddings, ~0.5M parameters).

    head_dim = hidden_size / num_heads must be a size vLLM's CPU attention accepts (64 works, 16 does not).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    config = Qwen2Config(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=TINY_MAX_MODEL_LEN,
        tie_word_embeddings=True,
        pad_token_id=VOCAB.index(PAD_TOKEN),
        eos_token_id=VOCAB.index(EOS_TOKEN),
        bos_token_id=None,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.float().eval()


def _write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build_tiny_assets(
    out_dir: str | Path,
    seed: int = 0,
    *,
    operations: Sequence[str] = DEFAULT_OPERATIONS,
    eval_fraction: float = 0.2,
) -> TinyAssets:
    """Write the tiny model, tokenizer and task files under ``out_dir``; same ``seed`` -> same files.

    Layout: ``out_dir/model`` (weights, config, tokenizer), ``out_dir/train.jsonl``, ``out_dir/eval.jsonl``.
    The eval prompts (``eval_fraction`` of all ``100 * len(operations)`` prompts) never appear in training.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)

    build_model(seed).save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)

    rows = task_rows(operations)
    random.Random(seed).shuffle(rows)
    num_eval = max(1, round(eval_fraction * len(rows)))
    train_file, eval_file = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    _write_jsonl(train_file, rows[num_eval:])
    _write_jsonl(eval_file, rows[:num_eval])
    return TinyAssets(model_dir=model_dir, train_file=train_file, eval_file=eval_file)
