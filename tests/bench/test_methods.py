"""The benchmarked methods: inputs drawn on the target device, deterministic per seed; run order;
``ours`` with the library's defaults, ``ours-fused`` with the fused Triton kernels (CUDA only)."""

import functools
import math

import pytest
import torch

import rpg_kernels as rk
from bench import methods
from bench.measure import CaseSpec, run_case
from bench.methods import METHODS, Skip, make_problem, run_order
from bench.shapes import Shape
from bench.suites import SUITES, cases

SHAPE = Shape("custom", 2048, 64, 4096)  # two sequences of 1024 tokens


def test_problem_is_deterministic_per_seed_and_has_the_documented_distributions():
    a = make_problem(SHAPE, "float32", "cpu", "loss", seed=3)
    b = make_problem(SHAPE, "float32", "cpu", "loss", seed=3)
    c = make_problem(SHAPE, "float32", "cpu", "loss", seed=4)
    for name in ("hidden", "weight", "targets", "old_logprobs", "ref_logprobs", "advantages", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
    assert a.hidden.shape == (2, 1024, 64) and a.weight.shape == (4096, 64) and a.advantages.shape == (2,)
    assert a.hidden.requires_grad and a.weight.requires_grad and a.bias is None
    assert a.targets.dtype == torch.int64 and 0 <= a.targets.min() and a.targets.max() < 4096
    logits = a.hidden.detach().reshape(-1, 64) @ a.weight.detach().T
    assert 0.95 < logits.std().item() < 1.05  # logits ~ N(0, 1)
    typical = -math.log(4096) - 0.5
    assert abs(a.old_logprobs.mean().item() - typical) < 0.01
    assert 0.09 < (a.old_logprobs - a.ref_logprobs).std().item() / math.sqrt(2) < 0.11
    assert 0.88 < a.mask.mean().item() < 0.92 and set(a.mask.unique().tolist()) == {0.0, 1.0}
    no_grad = make_problem(SHAPE, "bfloat16", "cpu", "logprobs", seed=3, bias=True)
    assert no_grad.hidden.dtype == no_grad.weight.dtype == no_grad.bias.dtype == torch.bfloat16
    assert not no_grad.hidden.requires_grad and no_grad.bias.shape == (4096,)
    assert no_grad.old_logprobs.dtype == torch.float32


def test_every_random_draw_happens_on_the_target_device(monkeypatch):
    """No tensor is drawn on the CPU and moved (600M numbers cost ~10 s per GPU case that way)."""
    seen = []
    for name in ("randn", "rand", "randint"):
        real = getattr(torch, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, str(kwargs.get("device")), kwargs["generator"].device.type))
            return _real(*args, **kwargs)

        monkeypatch.setattr(methods.torch, name, spy)
    make_problem(SHAPE, "float32", "cpu", "loss", bias=True)
    assert len(seen) == 8
    assert all(device == "cpu" and gen == "cpu" for _, device, gen in seen), seen


def test_ours_and_matmul_run_first_in_every_suite():
    assert run_order(["cce", "matmul", "naive", "ours"]) == ["ours", "matmul", "cce", "naive"]
    assert run_order(["naive", "x.py:f"]) == ["naive", "x.py:f"]
    shape = Shape("custom", 64, 8, 16)
    for suite in SUITES.values():
        if suite.name in ("long-context", "train-step"):  # searches of their own
            continue
        order = [m for m, _ in cases(suite, [shape, shape], list(reversed(METHODS)), "float32", "cpu", 0, 1)]
        assert order[: min(2, len(suite.methods))] == [m for m in ("ours", "matmul") if m in suite.methods]
    assert list(METHODS)[:2] == ["ours", "matmul"] and "ours-chunked" not in METHODS


def test_ours_calls_the_library_defaults_and_ours_fused_needs_cuda(monkeypatch):
    calls = []
    real = rk.fused_linear_rpg_loss

    @functools.wraps(real)  # the signature the method inspects
    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(rk, "fused_linear_rpg_loss", spy)
    problem = make_problem(Shape("custom", 32, 8, 16), "float32", "cpu", "loss")
    METHODS["ours"]("loss", problem)()
    assert "backend" not in calls[0] and "method" not in calls[0]  # "auto" for both
    assert problem.hidden.grad is not None and problem.weight.grad.abs().sum() > 0
    methods.rpg_kernels_step("loss", problem, backend="torch", deterministic=False)()
    assert calls[1]["backend"] == "torch" and calls[1]["deterministic"] is False
    with pytest.raises(Skip, match="no nonsense option"):
        methods.rpg_kernels_step("loss", problem, nonsense=1)
    with pytest.raises(Skip, match="need CUDA"):
        METHODS["ours-fused"]("loss", problem)


def test_the_dropped_chunked_method_is_an_unknown_name():
    spec = CaseSpec("ours-chunked", "loss", Shape("micro", 64, 32, 256), "float32", "cpu")
    result = run_case(spec)
    assert result.status == "error" and "unknown method 'ours-chunked'" in result.reason
