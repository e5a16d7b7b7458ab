"""`rpg_train.interrupt`: what a first and a second SIGINT/SIGTERM do where (the end-to-end runs are in
test_train_reliability.py)."""

import os
import signal
import time

import pytest
import torch

from rpg_train import interrupt
from rpg_train.distributed import DistInfo
from rpg_train.interrupt import StepAbandoned, StopRequest

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.5)  # the handler runs in the main thread as soon as the signal lands (sleep is cut short)


def test_a_step_is_abandoned_before_its_update_and_finished_after():
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(abandon_steps=True) as stop:
        with stop.region("finish"):
            interrupt.mark("step")  # train_step: before the first optimizer step
            with pytest.raises(StepAbandoned) as abandoned:
                send(signal.SIGTERM)
            assert abandoned.value.before_update and abandoned.value.exit_code == 143
    assert signal.getsignal(signal.SIGINT) is before  # restored

    with StopRequest(abandon_steps=True) as stop:
        with stop.region("finish"):
            interrupt.mark("finish")  # train_step: the optimizer steps
            send(signal.SIGINT)  # noted: the step goes on
            assert stop.signum == signal.SIGINT and stop.agreed(ONE)
            with pytest.raises(StepAbandoned) as second:  # a second one stops now, without a checkpoint
                send(signal.SIGINT)
            assert not second.value.before_update


def test_several_ranks_finish_the_step_and_outside_the_steps_the_run_stops_at_once():
    with StopRequest(abandon_steps=False) as stop:  # ranks must agree where they stop
        with stop.region("step"):
            send(signal.SIGINT)
            assert stop.signum == signal.SIGINT
    with StopRequest(abandon_steps=True) as stop:  # loading the model, say
        with pytest.raises(StepAbandoned) as abandoned:
            send(signal.SIGINT)
        assert not abandoned.value.before_update and abandoned.value.exit_code == 130
    interrupt.mark("step")  # no handler installed: nothing to mark


def test_a_signal_the_parent_ignores_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as nohup, or a script's background job
    try:
        with StopRequest(abandon_steps=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # ours
    finally:
        signal.signal(signal.SIGINT, previous)
