"""Prompt datasets: JSONL or parquet files of prompts with reference answers, tokenised once, sharded by rank.

Row schemas recognised without configuration (``prompt_key``/``answer_key`` override the detection):

| schema        | prompt field                      | answer field                                  |
|---------------|-----------------------------------|-----------------------------------------------|
| plain         | ``prompt`` (str)                  | ``answer``                                    |
| MATH / AIME   | ``problem`` (str)                 | ``answer``                                    |
| GSM8K         | ``question`` (str)                | ``answer``, the text after its last ``####``  |
| verl / DAPO   | ``prompt`` (chat messages list)   | ``reward_model.ground_truth``                 |

A prompt given as chat messages (``[{"role": ..., "content": ...}, ...]``) is rendered with the tokenizer's
chat template when ``chat_template=True``, else its message contents are joined with blank lines. A plain
string prompt with ``chat_template=True`` becomes one user message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class Prompt:
    """One prompt: the text the policy sees (after any chat template), its token ids, the reference answer."""

    text: str
    token_ids: list[int]
    answer: str
    row: int = 0  # 1-based row of its file (0: not from a file)


@dataclass(frozen=True)
class _Schema:
    name: str
    prompt_key: str
    answer_key: str  # dotted path into nested dicts


_SCHEMAS = (  # tried in order; the first whose keys are present in the first row wins
    _Schema("verl", "prompt", "reward_model.ground_truth"),
    _Schema("plain", "prompt", "answer"),
    _Schema("math", "problem", "answer"),
    _Schema("gsm8k", "question", "answer"),
)


def _get(row: dict, dotted_key: str) -> Any:
    value: Any = row
    for key in dotted_key.split("."):
        if not isinstance(value, dict) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as error:
            raise ValueError(f"{path}: cannot read parquet: {error}") from error
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: prompt files must be .jsonl or .parquet, got {path.suffix!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: row {line_number} is not valid JSON: {error}") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path}: row {line_number} must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _detect_schema(path: Path, first_row: dict, prompt_key: str | None, answer_key: str | None) -> _Schema:
    if prompt_key is not None and answer_key is not None:
        return _Schema("given", prompt_key, answer_key)
    for schema in _SCHEMAS:
        prompt_ok = (
            prompt_key in (None, schema.prompt_key) and _get(first_row, schema.prompt_key) is not _MISSING
        )
        answer_ok = (
            answer_key in (None, schema.answer_key) and _get(first_row, schema.answer_key) is not _MISSING
        )
        if prompt_ok and answer_ok:
            if schema.name == "verl" and not isinstance(first_row["prompt"], list):
                continue
            return schema
    if prompt_key is not None or answer_key is not None:
        return _Schema("given", prompt_key or "prompt", answer_key or "answer")
    raise ValueError(
        f"{path}: row 1 matches no known schema (fields {sorted(first_row)}); expected prompt/answer, "
        "problem/answer, question/answer (GSM8K) or prompt messages + reward_model.ground_truth (verl); "
        "or pass prompt_key= and answer_key="
    )


def _answer_text(value: Any, schema: _Schema, where: str) -> str:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(
            f"{where}: field {schema.answer_key!r} must be a string or number, got {value!r:.80}"
        )
    text = str(value).strip()
    if schema.name == "gsm8k":
        if "####" not in text:
            raise ValueError(f"{where}: field {schema.answer_key!r} has no '#### <answer>' (GSM8K schema)")
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    if not text:
        raise ValueError(f"{where}: field {schema.answer_key!r} is empty")
    return text


def _prompt_text(
    value: Any, tokenizer: PreTrainedTokenizerBase, chat_template: bool, schema: _Schema, where: str
) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: field {schema.prompt_key!r} is empty")
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, (list, tuple)) and value:
        messages = list(value)
        for i, message in enumerate(messages):
            if not (
                isinstance(message, dict) and isinstance(message.get("content"), str) and "role" in message
            ):
                raise ValueError(
                    f"{where}: field {schema.prompt_key!r}[{i}] must be a chat message "
                    f"{{'role': ..., 'content': str}}, got {message!r:.80}"
                )
    else:
        raise ValueError(
            f"{where}: field {schema.prompt_key!r} must be a string or a list of chat messages, "
            f"got {value!r:.80}"
        )
    if not chat_template:
        return value if isinstance(value, str) else "\n\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_prompts(
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    *,
    prompt_key: str | None = None,
    answer_key: str | None = None,
    chat_template: bool = False,
) -> list[Prompt]:
    """Read a JSONL or parquet prompt file and tokenise every prompt (schemas: see the module docstring).

    tokenizer: a transformers tokenizer (``__call__``; ``apply_chat_template`` when ``chat_template``).
    prompt_key / answer_key: field names overriding schema detection; ``answer_key`` may be a dotted path
    into nested fields ("reward_model.ground_truth").
    With a chat template the rendered text already holds its special tokens, so none are added on encoding.
    Raises ``ValueError`` naming the file, the row (1-based) and the field for a missing file, an unknown
    schema or a malformed row.
    """
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    schema = _detect_schema(path, rows[0], prompt_key, answer_key)
    if chat_template and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat_template=True but the tokenizer has no chat template")
    prompts = []
    for row_number, row in enumerate(rows, start=1):
        where = f"{path}: row {row_number}"
        prompt_value, answer_value = _get(row, schema.prompt_key), _get(row, schema.answer_key)
        for key, value in ((schema.prompt_key, prompt_value), (schema.answer_key, answer_value)):
            if value is _MISSING or value is None:
                raise ValueError(f"{where}: missing field {key!r} ({schema.name} schema)")
        text = _prompt_text(prompt_value, tokenizer, chat_template, schema, where)
        token_ids = list(tokenizer(text, add_special_tokens=not chat_template)["input_ids"])
        if not token_ids:
            raise ValueError(f"{where}: field {schema.prompt_key!r} tokenises to nothing")
        answer = _answer_text(answer_value, schema, where)
        prompts.append(Prompt(text=text, token_ids=token_ids, answer=answer, row=row_number))
    logger.info("loaded %d prompts from %s (%s schema)", len(prompts), path, schema.name)
    return prompts


def check_prompt_lengths(
    prompts: list[Prompt], path: str | Path, max_prompt_tokens: int, *, drop: bool, why: str = ""
) -> tuple[list[Prompt], int]:
    """The prompts of at most ``max_prompt_tokens`` tokens and how many were longer (``drop``), or a
    ``ValueError`` naming the file and row of the first longer one (``why``: where the limit comes from)."""
    kept = [p for p in prompts if len(p.token_ids) <= max_prompt_tokens]
    if len(kept) < len(prompts) and not drop:
        first = next(p for p in prompts if len(p.token_ids) > max_prompt_tokens)
        raise ValueError(
            f"{path}: row {first.row}: the prompt has {len(first.token_ids)} tokens, more than "
            f"{max_prompt_tokens}{f' ({why})' if why else ''}; {len(prompts) - len(kept)} of the file's "
            f"{len(prompts)} prompts are too long"
        )
    return kept, len(prompts) - len(kept)


def shard(prompts: Sequence[Prompt], rank: int, world_size: int) -> list[Prompt]:
    """The prompts of one rank: every ``world_size``-th prompt from ``rank`` on, equal counts on all ranks.

    The last ``len(prompts) % world_size`` prompts are dropped so that every rank runs the same number of
    steps (collectives must match); ranks never share a prompt.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_rank = len(prompts) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(prompts)} prompts cannot be split over world_size={world_size} ranks")
    if len(prompts) % world_size and rank == 0:
        logger.info("shard: dropping the last %d prompts for equal shards", len(prompts) % world_size)
    return list(prompts[rank : per_rank * world_size : world_size])
