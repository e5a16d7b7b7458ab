"""Verifiable rewards: math answers (math-verify), exact match (the tiny task), DAPO's overlong penalty.

A reward function scores a batch of decoded completions against their reference answers:

    reward_fn(completions: list[str], answers: list[str], *, lengths=None, max_len=None) -> list[float]

``lengths`` (completion lengths in tokens) and ``max_len`` (the rollout's ``max_tokens``) are needed only
with the overlong penalty. math-verify bounds its own parsing/verification time with ``SIGALRM``, which
only works in a process's main thread, so math answers are verified in a pool of worker processes (their
main threads), and the caller's thread only waits, with a deadline: an item that does not finish scores 0.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

REWARD_NAMES = ("math", "exact_match")

_BOXED = "\\boxed"
# "Answer: 42" on its own line (DAPO's format), optionally bold: "**Answer:** 42".
_ANSWER_LINE = re.compile(
    r"^[ \t]*\**answer\**[ \t]*:[ \t]*\**[ \t]*(.+?)[ \t]*$", re.IGNORECASE | re.MULTILINE
)


# ---------------------------------------------------------------------------------------------------------
# scoring of one completion


def exact_match_score(completion: str, answer: str) -> float:
    """Per-position credit in [0, 1]: 1 for exactly ``answer``, partial for a partly right answer.

    Whitespace is ignored. With ``c``, ``a`` the completion and answer characters,
    score = #{i : c[i] == a[i]} / max(len(c), len(a)); so "8" vs "8" -> 1, "83" vs "8" -> 1/2,
    "38" vs "8" -> 0, "17" vs "19" -> 1/2, "" -> 0.
    """
    predicted, expected = "".join(completion.split()), "".join(answer.split())
    if not expected:
        raise ValueError("answer must not be empty")
    matches = sum(p == e for p, e in zip(predicted, expected))
    return matches / max(len(predicted), len(expected))


def _last_boxed(text: str) -> str | None:
    """The last ``\\boxed{...}`` of ``text`` with balanced braces, or None."""
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    depth = 0
    for end in range(start + len(_BOXED), len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            return text[start : end + 1]
    return None


def extract_math_answer(completion: str) -> str | None:
    """The answer a completion commits to: its last ``\\boxed{...}``, else its last "Answer: ..." line.

    Returns LaTeX text for math-verify's ``parse`` (``\\boxed{...}`` or ``$...$``), or None when the
    completion states no answer in either form (free text is not searched for numbers).
    """
    boxed = _last_boxed(completion)
    if boxed is not None:
        return boxed
    lines = _ANSWER_LINE.findall(completion)
    if not lines:
        return None
    answer = lines[-1].strip().rstrip(".")
    return answer if "$" in answer or _BOXED in answer else f"${answer}$"


def _gold_latex(answer: str) -> str:
    answer = answer.strip()
    return answer if "$" in answer or _BOXED in answer else f"${answer}$"


def math_score(completion: str, answer: str) -> float:
    """1.0 if the completion's boxed / "Answer:" value equals ``answer`` mathematically (math-verify), else 0.

    Equivalent forms count (1/2 = 0.5 = \\frac{1}{2}). Uses SIGALRM timeouts: call it in a main thread.
    """
    from math_verify import parse, verify

    predicted_text = extract_math_answer(completion)
    if predicted_text is None:
        return 0.0
    gold, predicted = parse(_gold_latex(answer)), parse(predicted_text)
    if not gold or not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted) else 0.0


# ---------------------------------------------------------------------------------------------------------
# the worker pool


def _safe_call(fn: Callable[..., float], args: tuple) -> float:
    try:
        return float(fn(*args))
    except Exception as error:  # a malformed completion must not stop training
        logger.warning("reward: %s%r raised %r; scored 0", getattr(fn, "__name__", fn), args[:1], error)
        return 0.0


class VerificationPool:
    """Process pool that runs a scoring function in workers' main threads with a deadline per item.

    ``map(fn, items)`` returns ``fn(*item)`` per item; an item that raises scores 0.0, and items still
    running when their deadline passes score 0.0 (the pool is then killed and restarted, so a stuck
    verification cannot block later batches). Items run ``num_workers`` at a time, so item ``i`` gets
    ``timeout * (i // num_workers + 1)`` seconds from the start of the batch. ``fn`` must be picklable
    (a module-level function). Workers are spawned (not forked) so they do not inherit the trainer's
    threads; they start lazily, at the first ``map``.
    """

    def __init__(self, num_workers: int = 2, timeout: float = 10.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.num_workers, self.timeout = num_workers, float(timeout)
        self._pool: Any = None

    def _start(self) -> None:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
            self._pool.apply(abs, (0,))  # wait until the workers are up, so start-up is not billed to items

    def map(self, fn: Callable[..., float], items: Sequence[tuple]) -> list[float]:
        if not items:
            return []
        self._start()
        pending = [self._pool.apply_async(_safe_call, (fn, tuple(item))) for item in items]
        start = time.monotonic()
        scores, timed_out = [], 0
        for i, result in enumerate(pending):
            deadline = start + self.timeout * (i // self.num_workers + 1)
            try:
                scores.append(result.get(timeout=max(0.0, deadline - time.monotonic())))
            except multiprocessing.TimeoutError:
                scores.append(0.0)
                timed_out += 1
        if timed_out:
            logger.warning(
                "reward: %d of %d items passed the %.1fs timeout; scored 0",
                timed_out,
                len(items),
                self.timeout,
            )
            self.close()
        return scores

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# ---------------------------------------------------------------------------------------------------------
# reward functions


def overlong_penalty(
    lengths: Sequence[int], max_len: int, overlong_buffer: int, penalty_factor: float
) -> list[float]:
    """DAPO's soft overlong punishment, one value <= 0 per completion.

    With L the completion length and the buffer the last ``overlong_buffer`` tokens before ``max_len``:
    0 for L <= max_len - overlong_buffer, then falling linearly to -penalty_factor at L = max_len
    (and below it beyond): penalty = -penalty_factor * (L - (max_len - overlong_buffer)) / overlong_buffer.
    """
    if not 0 < overlong_buffer <= max_len:
        raise ValueError(f"overlong_buffer must be in (0, max_len={max_len}], got {overlong_buffer}")
    expected_len = max_len - overlong_buffer
    return [min(0.0, -penalty_factor * (length - expected_len) / overlong_buffer) for length in lengths]


class RewardFn:
    """Scores completions against answers; see the module docstring for the call signature."""

    def __init__(
        self,
        name: str,
        score: Callable[[str, str], float],
        *,
        pool: VerificationPool | None = None,
        overlong_buffer: int = 0,
        overlong_penalty_factor: float = 1.0,
    ):
        self.name, self._score, self._pool = name, score, pool
        self.overlong_buffer, self.overlong_penalty_factor = overlong_buffer, overlong_penalty_factor

    def __call__(
        self,
        completions: list[str],
        answers: list[str],
        *,
        lengths: list[int] | None = None,
        max_len: int | None = None,
    ) -> list[float]:
        if len(completions) != len(answers):
            raise ValueError(
                f"completions ({len(completions)}) and answers ({len(answers)}) differ in length"
            )
        for argument, values in (("completions", completions), ("answers", answers)):
            bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
            if bad is not None:
                raise TypeError(f"{argument}[{bad}] must be str, got {type(values[bad]).__name__}")
        items = list(zip(completions, answers))
        if self._pool is None:
            rewards = [_safe_call(self._score, item) for item in items]
        else:
            rewards = self._pool.map(self._score, items)
        if self.overlong_buffer:
            if lengths is None or max_len is None:
                raise ValueError("the overlong penalty needs lengths= and max_len=")
            if len(lengths) != len(completions):
                raise ValueError(
                    f"lengths ({len(lengths)}) and completions ({len(completions)}) differ in length"
                )
            penalties = overlong_penalty(lengths, max_len, self.overlong_buffer, self.overlong_penalty_factor)
            rewards = [r + p for r, p in zip(rewards, penalties)]
        return rewards

    def close(self) -> None:
        """Stop the worker processes (if any); the function restarts them when called again."""
        if self._pool is not None:
            self._pool.close()


def make_reward_fn(
    name: str,
    *,
    overlong_buffer: int = 0,
    overlong_penalty_factor: float = 1.0,
    num_workers: int = 2,
    timeout: float = 10.0,
) -> RewardFn:
    """Build a reward function by name.

    name: "math" (math-verify, scored in a ``VerificationPool`` of ``num_workers`` processes with a
          per-item ``timeout`` in seconds; ``num_workers=0`` scores in the calling thread, which must then
          be the main thread) or "exact_match" (per-position credit, see ``exact_match_score``; in-thread).
    overlong_buffer, overlong_penalty_factor: DAPO's overlong penalty (off when ``overlong_buffer`` is 0).
    """
    if name not in REWARD_NAMES:
        raise ValueError(f"reward name must be one of {REWARD_NAMES}, got {name!r}")
    if overlong_buffer < 0 or not math.isfinite(overlong_penalty_factor) or overlong_penalty_factor < 0:
        raise ValueError(
            f"overlong_buffer must be >= 0 and overlong_penalty_factor finite and >= 0, "
            f"got {overlong_buffer}, {overlong_penalty_factor}"
        )
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    score = math_score if name == "math" else exact_match_score
    pool = VerificationPool(num_workers, timeout) if name == "math" and num_workers > 0 else None
    return RewardFn(
        name,
        score,
        pool=pool,
        overlong_buffer=overlong_buffer,
        overlong_penalty_factor=overlong_penalty_factor,
    )
