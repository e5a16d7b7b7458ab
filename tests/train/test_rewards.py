"""Rewards: math-verify scoring, exact match, DAPO overlong penalty, the verification pool's timeout."""

import time

import pytest

from rpg_train.rewards import (
    VerificationPool,
    exact_match_score,
    extract_math_answer,
    make_reward_fn,
    overlong_penalty,
)

MATH_CASES = [  # (completion, answer, expected reward)
    ("so the total is \\boxed{42}.", "42", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("We get \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{1/2}", "$\\frac{1}{2}$", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("first \\boxed{2}, on reflection \\boxed{3}", "3", 1.0),  # the last box counts
    ("first \\boxed{3}, on reflection \\boxed{2}", "3", 0.0),
    ("\\boxed{\\frac{3}{4}}", "\\frac{4}{3}", 0.0),
    ("Reasoning...\nAnswer: 42", "42", 1.0),
    ("Reasoning...\n**Answer:** $\\frac{3}{4}$", "0.75", 1.0),
    ("Answer: 7\nAnswer: 8", "8", 1.0),
    ("Answer: 17", "42", 0.0),
    ("The answer is 42 but I will not box it", "42", 0.0),  # no boxed / Answer: line -> no answer
    ("@@##!!\\boxed{", "1", 0.0),
    ("", "1", 0.0),
]


@pytest.fixture(scope="module")
def math_reward():
    reward = make_reward_fn("math", num_workers=2, timeout=20.0)
    yield reward
    reward.close()


def test_math_reward_cases_in_the_pool(math_reward):
    completions, answers, expected = map(list, zip(*MATH_CASES))
    assert math_reward(completions, answers) == expected


def test_math_reward_in_thread_matches_pool(math_reward):
    completions, answers, _ = map(list, zip(*MATH_CASES[:6]))
    assert make_reward_fn("math", num_workers=0)(completions, answers) == math_reward(completions, answers)


def test_extract_math_answer():
    assert extract_math_answer("a \\boxed{\\frac{1}{\\sqrt{2}}} b") == "\\boxed{\\frac{1}{\\sqrt{2}}}"
    assert extract_math_answer("Answer: 12.") == "$12$"
    assert extract_math_answer("Answer: $x$") == "$x$"
    assert extract_math_answer("no answer here 12") is None
    assert extract_math_answer("\\boxed{unclosed") is None


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("8", "8", 1.0),
        (" 8 ", "8", 1.0),
        ("83", "8", 0.5),
        ("38", "8", 0.0),
        ("", "8", 0.0),
        ("17", "19", 0.5),
        ("1 9", "19", 1.0),
        ("123", "12", 2 / 3),
        ("9", "19", 0.0),
    ],
)
def test_exact_match(completion, answer, expected):
    assert exact_match_score(completion, answer) == pytest.approx(expected)
    assert make_reward_fn("exact_match")([completion], [answer]) == pytest.approx([expected])


def test_exact_match_rejects_empty_answer():
    # an empty answer is a data error; the reward function scores it 0 with a warning rather than crashing
    with pytest.raises(ValueError, match="answer"):
        exact_match_score("1", " ")
    assert make_reward_fn("exact_match")(["1"], [""]) == [0.0]


def test_overlong_penalty_buffer_edges():
    max_len, buffer, factor = 20, 4, 0.5
    lengths = [0, 15, 16, 17, 18, 19, 20]
    expected = [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5]
    assert overlong_penalty(lengths, max_len, buffer, factor) == pytest.approx(expected)
    reward = make_reward_fn("exact_match", overlong_buffer=buffer, overlong_penalty_factor=factor)
    got = reward(["8"] * len(lengths), ["8"] * len(lengths), lengths=lengths, max_len=max_len)
    assert got == pytest.approx([1.0 + e for e in expected])
    with pytest.raises(ValueError, match="lengths"):
        reward(["8"], ["8"])
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty([1], 4, 5, 1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="reward name"):
        make_reward_fn("bleu")
    with pytest.raises(ValueError, match="overlong"):
        make_reward_fn("math", overlong_buffer=-1)
    reward = make_reward_fn("exact_match")
    with pytest.raises(ValueError, match="differ"):
        reward(["1", "2"], ["1"])
    with pytest.raises(TypeError, match=r"completions\[1\]"):
        reward(["1", 2], ["1", "2"])


def test_pool_timeout_scores_zero_without_hanging():
    pool = VerificationPool(num_workers=1, timeout=0.5)
    try:
        assert pool.map(abs, [(-3,), (2.5,)]) == [3.0, 2.5]
        start = time.monotonic()
        assert pool.map(time.sleep, [(60,)]) == [0.0]
        assert time.monotonic() - start < 10
        assert pool.map(abs, [(-4,)]) == [4.0]  # restarted after the stuck worker was killed
    finally:
        pool.close()
