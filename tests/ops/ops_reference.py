"""Float64 reference of the fused linear log-probs that materialises the ``[N, V]`` logits (tests only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rpg_kernels.ops.lm_head import LMHead, UpstreamGrads

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
# bf16 tl.dot is wrong in the Triton interpreter (CONTRIBUTING.md): bf16 kernel tests need a GPU.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@dataclass
class Problem:
    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    targets: torch.Tensor  # [N] int64, some ignore_index
    grad_logprob: torch.Tensor  # [N] fp32
    grad_entropy: torch.Tensor  # [N] fp32
    temperature: float


def make_problem(
    seed: int,
    n: int,
    h: int,
    v: int,
    dtype=torch.float32,
    device="cpu",
    bias: bool = True,
    logit_scale: float = 3.0,
    temperature: float = 0.7,
    ignore_frac: float = 0.15,
    ignore_index: int = -100,
) -> Problem:
    """Random inputs whose logits have standard deviation about ``logit_scale * temperature``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_scale * temperature / h**0.5)
    b = torch.randn(v, generator=gen) * logit_scale * temperature if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_frac] = ignore_index
    grad_logprob = torch.randn(n, generator=gen)
    grad_entropy = torch.randn(n, generator=gen)
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype)
    return Problem(
        to(hidden),
        to(weight),
        to(b),
        targets.to(device),
        grad_logprob.to(device),
        grad_entropy.to(device),
        temperature,
    )


def reference(p: Problem, ignore_index: int = -100, with_entropy_grad: bool = True) -> dict:
    """Float64 logprob, entropy, lse, max |logit| and the grads of ``sum(g_l * logprob + g_H * entropy)``."""
    h = p.hidden.detach().double().requires_grad_(True)
    w = p.weight.detach().double().requires_grad_(True)
    b = p.bias.detach().double().requires_grad_(True) if p.bias is not None else None
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z / p.temperature
    valid = p.targets != ignore_index
    log_p = torch.log_softmax(z, dim=-1)
    logprob = torch.where(valid, log_p.gather(1, p.targets.clamp(min=0)[:, None])[:, 0], 0.0)
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    objective = (p.grad_logprob.double() * logprob).sum()
    if with_entropy_grad:
        objective = objective + (p.grad_entropy.double() * entropy).sum()
    objective.backward()
    return dict(
        logprob=logprob.detach(),
        entropy=entropy.detach(),
        lse=torch.logsumexp(z, -1).detach(),
        logit_max=z.detach().abs().max(),
        dh=h.grad,
        dw=w.grad,
        db=b.grad if b is not None else None,
    )


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, rel: float, scale: float = 1.0):
    """``max|actual - expected| <= rel * max(max|expected|, scale)`` and everything finite."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = rel * max(expected.abs().max().item() if expected.numel() else 0.0, scale)
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g}"


def head_of(p: Problem, ignore_index: int = -100) -> LMHead:
    """The `LMHead` of a problem (the dtype the problem was made in)."""
    return LMHead(p.hidden, p.weight, p.bias, p.targets, p.temperature, ignore_index)


def upstream(p: Problem, with_entropy_grad: bool = True) -> UpstreamGrads:
    """The problem's per-token upstream grads (entropy's only when asked)."""
    return UpstreamGrads(p.grad_logprob, p.grad_entropy if with_entropy_grad else None)
