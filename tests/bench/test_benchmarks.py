"""pytest-benchmark timings of the main paths at small shapes.

``pytest --benchmark-only tests/bench`` times them; the default run (``--benchmark-disable`` in
pyproject) executes each once as a smoke test. Methods that compile (torch.compile) are left to
``python -m bench``: their compile time would dominate here.
"""

import pytest

from bench.methods import METHODS, Skip, make_problem
from bench.shapes import Shape

SHAPE = Shape("small", 512, 64, 2048)


@pytest.mark.parametrize("task", ["loss", "logprobs"])
@pytest.mark.parametrize("method", ["naive", "ours", "matmul"])
def test_benchmark(benchmark, method, task):
    problem = make_problem(SHAPE, "float32", "cpu", task)
    try:
        step = METHODS[method](task, problem)
    except Skip as skip:
        pytest.skip(str(skip))
    benchmark.group = f"{task} N={SHAPE.n} H={SHAPE.h} V={SHAPE.v}"
    benchmark(step)
    if task == "loss":
        assert problem.hidden.grad is not None and problem.hidden.grad.abs().sum() > 0
        assert problem.weight.grad is not None and problem.weight.grad.isfinite().all()
