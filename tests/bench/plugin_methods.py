"""Methods with known behaviour, loaded by the harness tests as ``plugin_methods.py:NAME``."""

import os

import torch

from bench.methods import Skip

BIG_BYTES = 256 * 2**20


def boom(task, problem):
    raise RuntimeError("deliberate failure in setup")


def skipper(task, problem):
    raise Skip("deliberately skipped")


def idle(task, problem):
    return lambda: None


def big_alloc(task, problem):
    """A step that holds BIG_BYTES of touched memory while it runs."""

    def step():
        block = torch.ones(BIG_BYTES // 4, dtype=torch.float32)
        assert float(block[-1]) == 1.0

    return step


def crash(task, problem):
    def step():
        os._exit(7)

    return step


def interrupt(task, problem):
    """A step interrupted as a time limit's SIGINT would interrupt it."""

    def step():
        raise KeyboardInterrupt

    return step


def regrad(task, problem):
    """A step that only replaces the weight's gradient (the memory a real loss step's gradients take)."""

    def step():
        problem.zero_grad()
        problem.weight.grad = torch.ones_like(problem.weight)

    return step
