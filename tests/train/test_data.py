"""Prompt loading: each schema from JSONL and parquet, chat templates, errors naming file/row/field."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rpg_train.data import Prompt, check_prompt_lengths, load_prompts, shard

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A whitespace word-level tokenizer with a BOS it adds to plain text, and a chat template."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = "<unk> <s> <|user|> <|system|> <|assistant|> what is two plus three ? be brief . solve x".split()
    word_level = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    word_level.pre_tokenizer = WhitespaceSplit()
    word_level.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


QUESTION = "what is two plus three ?"
MESSAGES = [{"role": "system", "content": "be brief ."}, {"role": "user", "content": QUESTION}]
SCHEMAS = {  # name: (rows, expected answers)
    "plain": ([{"prompt": QUESTION, "answer": "5"}, {"prompt": "solve x", "answer": "7"}], ["5", "7"]),
    "math": ([{"problem": QUESTION, "answer": "\\frac{1}{2}", "solution": "..."}], ["\\frac{1}{2}"]),
    "gsm8k": ([{"question": QUESTION, "answer": "2 + 3 = 5\n#### 1,234"}], ["1234"]),
    "verl": (
        [{"prompt": MESSAGES, "reward_model": {"ground_truth": "5", "style": "rule"}, "data_source": "x"}],
        ["5"],
    ),
}


@pytest.mark.parametrize("writer", [write_jsonl, write_parquet], ids=["jsonl", "parquet"])
@pytest.mark.parametrize("schema", list(SCHEMAS))
def test_schemas(tmp_path, tokenizer, schema, writer):
    rows, answers = SCHEMAS[schema]
    suffix = ".jsonl" if writer is write_jsonl else ".parquet"
    prompts = load_prompts(writer(tmp_path / f"data{suffix}", rows), tokenizer)
    assert [p.answer for p in prompts] == answers
    for prompt in prompts:
        assert isinstance(prompt, Prompt)
        assert prompt.token_ids == tokenizer(prompt.text)["input_ids"]
        assert prompt.token_ids[0] == tokenizer.bos_token_id
    if schema == "verl":  # messages without a template: contents joined
        assert prompts[0].text == "be brief .\n\nwhat is two plus three ?"
    else:
        assert prompts[0].text == QUESTION


def test_chat_template_for_messages_and_strings(tmp_path, tokenizer):
    verl = write_parquet(tmp_path / "d.parquet", SCHEMAS["verl"][0])
    (prompt,) = load_prompts(verl, tokenizer, chat_template=True)
    assert prompt.text == "<|system|> be brief . <|user|> what is two plus three ? <|assistant|>"
    assert prompt.token_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in prompt.token_ids and tokenizer.bos_token_id not in prompt.token_ids
    plain = write_jsonl(tmp_path / "p.jsonl", SCHEMAS["plain"][0])
    assert load_prompts(plain, tokenizer, chat_template=True)[1].text == "<|user|> solve x <|assistant|>"


def test_explicit_keys(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", [{"q": "solve x", "meta": {"gold": 3}}])
    (prompt,) = load_prompts(path, tokenizer, prompt_key="q", answer_key="meta.gold")
    assert (prompt.text, prompt.answer) == ("solve x", "3")


def test_tiny_task_file_loads_with_its_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from rpg_train.tiny import build_tiny_assets

    assets = build_tiny_assets(tmp_path, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    prompts = load_prompts(assets.train_file, tokenizer)
    assert len(prompts) == 80 and all(len(p.token_ids) == 4 for p in prompts)
    assert all(tokenizer.decode(p.token_ids) == p.text for p in prompts)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, r"does not exist"),
        ("", r"no rows"),
        ('{"prompt": "solve x", "answer": "1"}\n{"prompt": "solve x"\n', r"row 2 is not valid JSON"),
        ('{"prompt": "solve x", "answer": "1"}\n{"prompt": "solve x"}\n', r"row 2: missing field 'answer'"),
        ('{"prompt": "solve x", "answer": "1"}\n{"prompt": 5, "answer": "1"}\n', r"row 2: field 'prompt'"),
        ('{"prompt": "solve x", "answer": "1"}\n{"prompt": " ", "answer": "1"}\n', r"row 2: field 'prompt'"),
        ('{"prompt": "solve x", "answer": ""}\n', r"row 1: field 'answer' is empty"),
        ('{"prompt": "solve x", "answer": {"a": 1}}\n', r"row 1: field 'answer' must be"),
        ('{"question": "solve x", "answer": "7"}\n', r"row 1: field 'answer' has no '####"),
        ('{"text": "solve x", "label": "7"}\n', r"row 1 matches no known schema"),
        ("[1, 2]\n", r"row 1 must be a JSON object"),
        (
            '{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}\n',
            r"row 1: field 'prompt'\[0\]",
        ),
    ],
)
def test_errors_name_file_row_and_field(tmp_path, tokenizer, content, match):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        load_prompts(path, tokenizer)
    assert "bad.jsonl" in str(error.value)


def test_other_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        load_prompts(write_jsonl(tmp_path / "d.csv", SCHEMAS["plain"][0]), tokenizer)
    tokenizer_without_template = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        load_prompts(
            write_jsonl(tmp_path / "d.jsonl", SCHEMAS["plain"][0]),
            tokenizer_without_template,
            chat_template=True,
        )


def test_shard_is_a_disjoint_equal_split():
    prompts = [Prompt(text=str(i), token_ids=[i], answer=str(i)) for i in range(11)]
    for world_size in (1, 2, 3, 4, 11):
        shards = [shard(prompts, rank, world_size) for rank in range(world_size)]
        assert {len(s) for s in shards} == {11 // world_size}
        taken = [p.text for s in shards for p in s]
        assert len(taken) == len(set(taken)) == 11 // world_size * world_size
    assert [p.text for p in shard(prompts, 1, 3)] == ["1", "4", "7"]
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank|world_size"):
            shard(prompts, rank, world_size)
    with pytest.raises(ValueError, match="cannot be split"):
        shard(prompts, 0, 12)


def test_prompt_lengths_checked_naming_the_file_row_or_dropped_with_a_count(tmp_path, tokenizer):
    rows = [{"prompt": "what is two plus three ?", "answer": "5"}, {"prompt": "solve x", "answer": "1"}] * 2
    rows[2] = {"prompt": "what is two plus three ? be brief . solve x", "answer": "5"}  # 12 tokens with BOS
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts = load_prompts(path, tokenizer)
    assert [p.row for p in prompts] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=rf"{path}: row 3: the prompt has 12 tokens, more than 8 \(why\)"):
        check_prompt_lengths(prompts, path, 8, drop=False, why="why")
    kept, dropped = check_prompt_lengths(prompts, path, 8, drop=True)
    assert dropped == 1 and [p.row for p in kept] == [1, 2, 4]
