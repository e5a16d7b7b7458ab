"""The implementations benchmarked side by side, one small function each.

A method takes a ``task`` and a ``Problem`` and returns a zero-argument ``step`` that runs the
task once:

- ``"loss"``: forward + backward of a policy-gradient loss computed from hidden states through
  the LM head (gradients reach ``hidden`` and ``weight``);
- ``"logprobs"``: forward only, no autograd: the per-token log-probs ``log softmax(h W^T)[y]``
  (what the old/reference log-prob passes compute).

A method that cannot run here raises ``Skip`` with the reason. Extra methods can be loaded from a
file: ``--methods path/to/file.py:function`` (same signature).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from bench.shapes import Shape

if TYPE_CHECKING:
    from rpg_kernels import LossConfig

Step = Callable[[], None]
Method = Callable[[str, "Problem"], Step]

TOKEN_CHUNK = 1024  # tokens per chunk of the chunked PyTorch baseline
TASKS = ("loss", "logprobs")


class Skip(Exception):
    """The method cannot run on this machine or for this task; the message says why."""


@dataclass
class Problem:
    """Inputs of one benchmark case, allocated before measuring (they are not counted as peak memory).

    hidden [B, T, H] and weight [V, H] (``dtype``, requires grad for the loss task); targets [B, T]
    int64; old/ref log-probs [B, T] fp32; advantages [B] fp32; mask [B, T] fp32; ``bias`` [V] or None.
    """

    shape: Shape
    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def on_cuda(self) -> bool:
        return self.hidden.device.type == "cuda"

    def zero_grad(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None
        if self.bias is not None:
            self.bias.grad = None


def make_problem(
    shape: Shape, dtype: str, device: str, task: str, seed: int = 0, bias: bool = False
) -> Problem:
    """Random inputs with realistic magnitudes: logits ~ N(0, 1), ratios exp(l - l_old) near 1.

    Drawn on ``device`` by a ``torch.Generator`` of that device (deterministic per seed and device;
    a CUDA run never draws its hundreds of millions of numbers on the CPU). ``bias``: an LM-head bias
    ``[V]`` ~ N(0, 0.5^2) too (the benchmark's methods take none; `bench.phases` can time one).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    b, t = shape.layout()
    torch_dtype = getattr(torch, dtype)
    grad = task == "loss"

    def randn(*size: int, scale: float = 1.0, to: torch.dtype = torch_dtype) -> torch.Tensor:
        # fp32 draws scaled then rounded once, whatever the input dtype
        return (torch.randn(*size, generator=gen, device=device) * scale).to(to)

    hidden = randn(b, t, shape.h).requires_grad_(grad)
    weight = randn(shape.v, shape.h, scale=shape.h**-0.5).requires_grad_(grad)
    targets = torch.randint(0, shape.v, (b, t), generator=gen, device=device)
    # log-probs of N(0, 1) logits are about -log V - 1/2; perturb them so that ratios vary
    typical = -math.log(shape.v) - 0.5
    old = typical + randn(b, t, scale=0.1, to=torch.float32)
    ref = typical + randn(b, t, scale=0.1, to=torch.float32)
    advantages = randn(b, to=torch.float32)
    mask = (torch.rand(b, t, generator=gen, device=device) < 0.9).float()
    head_bias = randn(shape.v, scale=0.5).requires_grad_(grad) if bias else None
    return Problem(shape, hidden, weight, targets, old, ref, advantages, mask, head_bias)


# --- the loss every PyTorch-side method puts on top of its log-probs ------------------------------


def loss_config() -> LossConfig:
    """The RPG configuration benchmarked (paper defaults: REINFORCE-style RPG, unnormalised reverse KL)."""
    import rpg_kernels as rk

    return rk.LossConfig(algo="rpg_reinforce", kl="urkl", beta=1e-4, eps_low=0.2, eps_high=0.28, clip_c=10.0)


def _per_token_loss_step(p: Problem, logprobs_fn: Callable[[], torch.Tensor]) -> Step:
    """Step = ``rpg_loss`` on the log-probs that ``logprobs_fn`` returns ([B, T]), then backward."""
    import rpg_kernels as rk

    config = loss_config()

    def step() -> None:
        p.zero_grad()
        logprobs = logprobs_fn()
        loss, _ = rk.rpg_loss(
            logprobs, p.old_logprobs, p.advantages, p.mask, ref_logprobs=p.ref_logprobs, config=config
        )
        loss.backward()

    return step


def _no_grad_step(fn: Callable[[], torch.Tensor]) -> Step:
    def step() -> None:
        with torch.no_grad():
            fn()

    return step


# --- methods ------------------------------------------------------------------------------------


def naive(task: str, p: Problem) -> Step:
    """Materialised [N, V] logits, fp32 log_softmax, gather; autograd does the rest."""

    def logprobs() -> torch.Tensor:
        logits = (p.hidden @ p.weight.T).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, p.targets.unsqueeze(-1)).squeeze(-1)

    return _per_token_loss_step(p, logprobs) if task == "loss" else _no_grad_step(logprobs)


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of one chunk: hidden [C, H], weight [V, H], targets [C] -> [C] fp32."""
    logits = (hidden @ weight.T).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def torch_compile(task: str, p: Problem) -> Step:
    """The naive math over chunks of ``TOKEN_CHUNK`` tokens, each chunk ``torch.compile``d and
    (for the loss) checkpointed, so only one chunk's logits live at a time."""
    from torch.utils.checkpoint import checkpoint

    compiled = torch.compile(_chunk_logprobs, dynamic=False)
    h = p.shape.h

    def logprobs() -> torch.Tensor:
        flat_hidden = p.hidden.reshape(-1, h)
        flat_targets = p.targets.reshape(-1)
        parts = []
        for start in range(0, flat_hidden.shape[0], TOKEN_CHUNK):
            chunk = (
                flat_hidden[start : start + TOKEN_CHUNK],
                p.weight,
                flat_targets[start : start + TOKEN_CHUNK],
            )
            if torch.is_grad_enabled():
                parts.append(checkpoint(compiled, *chunk, use_reentrant=False))
            else:
                parts.append(compiled(*chunk))
        return torch.cat(parts).view_as(p.targets)

    return _per_token_loss_step(p, logprobs) if task == "loss" else _no_grad_step(logprobs)


def liger_chunked(task: str, p: Problem) -> Step:
    """Liger-Kernel's chunked fused-linear GRPO loss (PyTorch, ``torch.compile``d loss math).

    It computes Liger's GRPO loss (token-level ratio, clip 0.2/0.28, k3 KL with beta 0.04), not RPG:
    the per-token loss is a negligible part of the cost; the LM head dominates.
    """
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
    except ImportError as err:
        raise Skip(f"liger-kernel not installed ({err})") from err
    if task == "logprobs":
        return _no_grad_step(lambda: LigerFusedLinearPPOBase.chunk_forward(p.hidden, p.weight, p.targets))
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=0.04, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28, use_ref_model=True, compiled=True
    )

    def step() -> None:
        p.zero_grad()
        loss, _ = loss_fn(
            p.hidden,
            p.weight,
            p.targets,
            p.mask,
            p.advantages,
            ref_per_token_logps=p.ref_logprobs,
            old_per_token_logps=p.old_logprobs,
        )
        loss.backward()

    return step


def liger_triton(task: str, p: Problem) -> Step:
    """Liger-Kernel's Triton GRPO loss on materialised logits (``triton_grpo_loss``; logprobs task:
    ``fused_selective_log_softmax``). The logits [B, T+1, V] come from a plain matmul."""
    if not p.on_cuda:
        raise Skip("Liger's triton_grpo_loss is a CUDA Triton kernel; no GPU on this machine")
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss
    except ImportError as err:
        raise Skip(f"liger-kernel not installed ({err})") from err
    b, t = p.shape.layout()
    # Liger drops the last position of the logits (B, T+1, V): give it T+1 hidden rows per sequence
    extra = torch.zeros(b, 1, p.shape.h, dtype=p.hidden.dtype, device=p.device)
    hidden = torch.cat([p.hidden.detach(), extra], dim=1).requires_grad_(p.hidden.requires_grad)

    if task == "logprobs":
        return _no_grad_step(lambda: fused_selective_log_softmax(hidden @ p.weight.T, p.targets, 1.0))

    def step() -> None:
        hidden.grad = None
        p.zero_grad()
        logits = hidden @ p.weight.T
        loss, _ = triton_grpo_loss(
            logits,
            p.old_logprobs,
            p.ref_logprobs,
            p.targets,
            p.advantages,
            p.mask,
            temperature=1.0,
            beta=0.04,
            eps_low=0.2,
            eps_high=0.28,
            loss_type="grpo",
            reduce=True,
        )
        loss.backward()

    return step


CCE_CPU_NOTE = "CPU: impl=torch_compile (materialises the logits; CCE's memory-saving kernel needs CUDA)"


def cce(task: str, p: Problem) -> Step:
    """Cut Cross Entropy: log-probs = -linear_cross_entropy(h, W, y, reduction="none"), then our
    per-token loss. Its Triton kernel on GPU; on CPU its ``torch_compile`` implementation."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as err:
        raise Skip(f"cut-cross-entropy not installed ({err})") from err
    impl = "cce" if p.on_cuda else "torch_compile"

    def logprobs() -> torch.Tensor:
        return -linear_cross_entropy(p.hidden, p.weight, p.targets, reduction="none", impl=impl).float()

    return _per_token_loss_step(p, logprobs) if task == "loss" else _no_grad_step(logprobs)


def ours(task: str, p: Problem) -> Step:
    """rpg_kernels.fused_linear_rpg_loss / fused_linear_logprobs with their defaults (``backend`` and
    ``method`` "auto"): on CUDA the single pass (cuBLAS chunk GEMMs + one Triton row kernel), on CPU the
    chunked PyTorch path."""
    return rpg_kernels_step(task, p)


def ours_fused(task: str, p: Problem) -> Step:
    """The same functions with ``backend="triton", method="fused"``: the fused Triton kernels, which
    hold no ``[C, V]`` logits chunk at all (the least memory; the logits are recomputed in the backward)."""
    if not p.on_cuda:
        raise Skip("the fused Triton kernels need CUDA (on CPU only the Triton interpreter runs them)")
    return rpg_kernels_step(task, p, backend="triton", method="fused")


def rpg_kernels_step(task: str, p: Problem, **options: object) -> Step:
    """A step of ``rpg_kernels.fused_linear_rpg_loss`` (loss task, paper-default RPG config, ``p.bias``)
    or ``fused_linear_logprobs`` (logprobs task), ``options`` (backend, method, deterministic, ...)
    passed through."""
    try:
        import rpg_kernels as rk

        fused_loss, fused_logprobs = rk.fused_linear_rpg_loss, rk.fused_linear_logprobs
    except (ImportError, AttributeError) as err:
        raise Skip(f"rpg_kernels fused API not available ({err})") from err
    fn = fused_loss if task == "loss" else fused_logprobs
    unknown = sorted(set(options) - set(inspect.signature(fn).parameters))
    if unknown:
        raise Skip(f"this rpg_kernels has no {', '.join(unknown)} option")
    if p.bias is not None:
        options = {**options, "bias": p.bias}
    if task == "logprobs":
        return _no_grad_step(lambda: fn(p.hidden, p.weight, p.targets, **options))
    config = loss_config()

    def step() -> None:
        p.zero_grad()
        loss, _ = fn(
            p.hidden,
            p.weight,
            p.targets,
            p.old_logprobs,
            p.advantages,
            p.mask,
            ref_logprobs=p.ref_logprobs,
            config=config,
            **options,
        )
        loss.backward()

    return step


def matmul(task: str, p: Problem) -> Step:
    """The bare LM-head matmul ``h @ W^T`` (loss task: with its backward, given a stored [N, V]
    upstream gradient): the floor every fused method is compared with."""
    if task == "logprobs":
        return _no_grad_step(lambda: p.hidden @ p.weight.T)
    gen = torch.Generator(device=p.device).manual_seed(1)
    size = (*p.hidden.shape[:-1], p.shape.v)
    grad_logits = torch.randn(size, generator=gen, dtype=p.hidden.dtype, device=p.device)

    def step() -> None:
        p.zero_grad()
        (p.hidden @ p.weight.T).backward(grad_logits)

    return step


# Registration order is run order: ``ours`` and the bare ``matmul`` (the floor) first in every suite,
# so that a run cut short still has the two numbers every other row is read against.
METHODS: dict[str, Method] = {
    "ours": ours,
    "matmul": matmul,
    "ours-fused": ours_fused,
    "naive": naive,
    "torch-compile": torch_compile,
    "liger-chunked": liger_chunked,
    "liger-triton": liger_triton,
    "cce": cce,
}
FIRST = ("ours", "matmul")


def run_order(methods: list[str]) -> list[str]:
    """``methods`` with ``ours`` and ``matmul`` moved to the front (the rest keep their order)."""
    first = [m for m in FIRST if m in methods]
    return first + [m for m in methods if m not in FIRST]


def method_note(name: str, device: str) -> str:
    """A remark shown next to a method's results (what exactly ran)."""
    if name == "cce" and device != "cuda":
        return CCE_CPU_NOTE
    if name == "liger-chunked":
        return "Liger's GRPO loss (k3 KL), not RPG"
    if name == "liger-triton":
        return "Liger's GRPO loss on materialised logits"
    if name == "ours-fused":
        return "fused Triton kernels, no [C, V] workspace"
    return ""


def resolve_method(name: str) -> Method:
    """A registered method by name, or ``path/to/file.py:function`` loaded from a file."""
    if name in METHODS:
        return METHODS[name]
    path, sep, attr = name.rpartition(":")
    if not sep or not path.endswith(".py"):
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)} or FILE.py:FUNCTION")
    spec = importlib.util.spec_from_file_location(f"bench_plugin_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"method {name!r}: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, attr)
