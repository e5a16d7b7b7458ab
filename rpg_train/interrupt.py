"""SIGINT / SIGTERM during a run: stop at a step boundary with a checkpoint; exit status 130 / 143.

`StopRequest` replaces both handlers while `train` runs. What a first signal does depends on what the run
is doing, which the loop marks with `region`:

- ``"step"``, a step before its first optimizer step (rollouts, rewards, old/reference log-probs,
  advantages): the policy is still the previous step's, so the step is abandoned at once (`StepAbandoned`)
  and the checkpoint holds the previous step with the RNG states and data position this step started
  from; ``--resume`` redoes the step exactly. With several ranks the step is finished instead (the ranks
  must agree on where they stop: one all-reduce per step, `StopRequest.agreed`).
- ``"finish"``, from the first optimizer step to the step's checkpoint: the signal is noted, the step is
  finished, then checkpointed.
- ``"abandon"`` (outside the steps: loading, the summary and export): the run stops at once.

A second signal abandons whatever runs, without writing (the last committed checkpoint stays valid; a
half-written one is removed at the next start).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REGIONS = ("abandon", "step", "finish")
_ACTIVE: StopRequest | None = None


class StepAbandoned(BaseException):
    """Raised by the handler to unwind the running work; a BaseException, so that no library's
    ``except Exception`` swallows it. ``before_update``: raised before the step changed the policy."""

    def __init__(self, signum: int, before_update: bool) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum, self.before_update = signum, before_update

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupted(Exception):
    """The run stopped on a signal; ``checkpoint`` is where it can be resumed from (None: nothing trained)."""

    def __init__(self, signum: int, checkpoint: str | None, message: str) -> None:
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """The run's handler for SIGINT/SIGTERM (a context manager; a no-op outside the main thread, and for a
    signal the process was started ignoring).

    ``abandon_steps``: whether a step may be abandoned before its first optimizer step (one process).
    """

    def __init__(self, *, abandon_steps: bool) -> None:
        self.abandon_steps = abandon_steps
        self.signum: int | None = None
        self._region = "abandon"
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            # a signal the parent ignores stays ignored (nohup; SIGINT of a background job in a script)
            ignored = {sig for sig in SIGNALS if signal.getsignal(sig) is signal.SIG_IGN}
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS if sig not in ignored}
            _ACTIVE = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _ACTIVE
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if _ACTIVE is self:
            _ACTIVE = None

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        abandon = self._region == "abandon" or (self._region == "step" and self.abandon_steps)
        if not first or abandon:
            raise StepAbandoned(signum, before_update=first and self._region == "step")
        # os.write: print() may be inside a write of the same stream when the signal lands
        name = signal.Signals(signum).name
        os.write(
            2, f"\nrpg_train: {name}: finishing this step, then a checkpoint (again to stop now)\n".encode()
        )

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        """Mark what runs inside as ``name`` (one of `REGIONS`) for the handler."""
        if name not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {name!r}")
        outer, self._region = self._region, name
        try:
            yield
        finally:
            self._region = outer

    def agreed(self, info) -> bool:
        """Whether any rank was asked to stop (collective under torchrun: call it on every rank)."""
        from rpg_train.distributed import broadcast_flag

        return broadcast_flag(self.signum is not None, info)


def mark(name: str) -> None:
    """Mark what runs from here on as ``name`` for the active handler (if any), until the enclosing
    `StopRequest.region` ends: `rpg_train.train.train_step` marks its part before the first optimizer
    step as ``"step"`` and the rest as ``"finish"``."""
    if name not in REGIONS:
        raise ValueError(f"region must be one of {REGIONS}, got {name!r}")
    if _ACTIVE is not None:
        _ACTIVE._region = name
