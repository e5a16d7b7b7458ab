"""The single pass on the Triton backend: per token chunk, cuBLAS GEMMs and one Triton row kernel.

For each chunk of ``C`` real tokens (masked-out and ``ignore_index`` rows are gathered away first, so
padding costs nothing and NaN there never reaches a GEMM), docs/MATH.md §6:

1. ``z = h_c @ W.T`` by cuBLAS, 16-bit operands with an **fp32** result, into an fp32 ``[C, V]`` buffer
   (a bf16 chunk would round every logit to 8 bits: a 2-3 % error in each importance ratio);
2. `rpg_kernels.ops.logit_rows`: statistics, log-prob, entropy, the per-token loss and ``dz`` per row,
   ``dz`` in the operand dtype (in place for fp32);
3. ``dh_c = dz @ W`` and ``dW += dz.T @ h_c`` by cuBLAS, ``dW`` and ``db`` accumulated in place in fp32.

That is ``6 N H V`` flops, all of them in cuBLAS. The chunk size follows ``workspace_bytes`` (the fp32
chunk plus its 16-bit ``dz``): `chunk_rows`. ``fp16`` gradients are scaled per chunk by a power of two
before their 16-bit ``dz`` is written (with ``g_l ~ 1/N`` and ``p ~ 1/V`` they fall below fp16's
smallest subnormal otherwise) and unscaled inside the GEMMs; they are kept in fp32 until backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig
from rpg_kernels.ops.lm_head import (
    HeadGrads,
    HeadOptions,
    LMHead,
    UpstreamGrads,
    addmm_fp32_,
    fp16_scale,
    mm_fp32,
)
from rpg_kernels.ops.logit_rows import MODE_GRADS, MODE_LOSS, MODE_STATS, launch_logit_rows


@dataclass(frozen=True)
class TokenLossProblem:
    """The per-token loss of a fused call, flat ``[N]`` in the compute dtype, 0 where ``~keep``:
    ``old``, ``ref`` (None: the sampler), ``adv``, ``weight`` (aggregation weights), ``rollout_weight``
    (None = 1); ``keep`` bool (masked in, with a target); the `LossConfig` and ``entropy_coef``."""

    old: Tensor
    ref: Tensor | None
    adv: Tensor
    weight: Tensor
    rollout_weight: Tensor | None
    keep: Tensor
    config: LossConfig
    entropy_coef: float


@dataclass
class TokenOutputs:
    """Per-token results ``[N]`` (0 where no row ran): ``logprob``, ``entropy``, ``lse`` (fp32); with a loss
    also ``loss``, ``kl``, ``ratio`` (compute dtype) and ``zone`` (int8)."""

    logprob: Tensor
    entropy: Tensor
    lse: Tensor
    loss: Tensor | None = None
    kl: Tensor | None = None
    ratio: Tensor | None = None
    zone: Tensor | None = None


def chunk_rows(n_rows: int, vocab: int, operand_dtype: torch.dtype, workspace_bytes: int) -> int:
    """Rows per chunk: the fp32 logits chunk and, for 16-bit operands, its ``dz`` within the budget."""
    per_row = vocab * (4 + (0 if operand_dtype == torch.float32 else operand_dtype.itemsize))
    return max(1, min(n_rows, int(workspace_bytes) // per_row))


class _Chunks:
    """The gathered rows, the chunk buffers and the fp32 gradient accumulators of one call."""

    def __init__(self, head: LMHead, rows: Tensor, options: HeadOptions, with_grads: bool):
        self.head, self.rows, self.options = head, rows, options  # rows: [n] indices of the tokens that run
        self.n = rows.numel()
        self.all_rows = self.n == head.n_tokens  # then chunks are slices: no gather, no scatter
        dtype, device = head.hidden.dtype, head.hidden.device
        self.dtype = dtype
        # statistics only: no dz, so the whole budget goes to the fp32 chunk
        self.chunk = chunk_rows(
            self.n, head.vocab, dtype if with_grads else torch.float32, options.workspace_bytes
        )
        self.z = torch.empty((self.chunk, head.vocab), dtype=torch.float32, device=device)
        self.dz = None
        if with_grads and dtype != torch.float32:
            self.dz = torch.empty((self.chunk, head.vocab), dtype=dtype, device=device)
        self.bias32 = head.bias.float().contiguous() if head.bias is not None else None
        need_h, need_w, need_b = options.need if with_grads else (False, False, False)
        self.fp16 = dtype == torch.float16
        grad_h_dtype = torch.float32 if self.fp16 else dtype
        self.dh = torch.zeros_like(head.hidden, dtype=grad_h_dtype) if need_h else None
        self.dw = torch.zeros(head.weight.shape, dtype=torch.float32, device=device) if need_w else None
        has_bias = need_b and head.bias is not None
        self.db = torch.zeros(head.vocab, dtype=torch.float32, device=device) if has_bias else None

    def __iter__(self):
        """``(position in rows, token indices or slice, h_c, z)`` per chunk, ``z`` holding ``h_c @ W.T``."""
        for start in range(0, self.n, self.chunk):
            stop = min(start + self.chunk, self.n)
            tokens = slice(start, stop) if self.all_rows else self.rows[start:stop]
            h_c = self.head.hidden[tokens]
            z = self.z[: stop - start]
            mm_fp32(h_c, self.head.weight.T, out=z)
            self.options.lap("logits_gemm")
            yield slice(start, stop), tokens, h_c, z

    def dz_buffer(self, z: Tensor) -> Tensor:
        """Where the row kernel writes ``dz``: a 16-bit buffer for bf16, in place (fp32) otherwise."""
        if self.dtype == torch.bfloat16:
            return self.dz[: z.shape[0]]
        return z

    def add(self, tokens: slice | Tensor, h_c: Tensor, z: Tensor) -> None:
        """Accumulate the chunk's ``dh``, ``dW``, ``db`` from the ``dz`` the row kernel just wrote."""
        scale = 1.0
        if self.fp16:  # one host sync per chunk, fp16 only
            scale = fp16_scale(float(z.abs().amax()) if z.numel() else 0.0)
            dz = self.dz[: z.shape[0]]
            dz.copy_(z.mul_(scale))
        else:
            dz = self.dz_buffer(z)
        inv = 1.0 / scale
        weight = self.head.weight
        if self.dh is not None:
            if self.fp16 or not self.all_rows:
                dh_c = torch.empty((dz.shape[0], weight.shape[1]), dtype=self.dh.dtype, device=dz.device)
                if self.fp16:
                    mm_fp32(dz, weight, out=dh_c).mul_(inv)
                else:
                    torch.mm(dz, weight, out=dh_c)
                if self.all_rows:
                    self.dh[tokens] = dh_c
                else:
                    self.dh.index_copy_(0, tokens, dh_c)
            else:
                torch.mm(dz, weight, out=self.dh[tokens])
            self.options.lap("dh_gemm")
        if self.dw is not None:
            addmm_fp32_(self.dw, dz.T, h_c, alpha=inv)
            self.options.lap("dw_gemm")
        if self.db is not None:
            self.db.add_(dz.sum(dim=0, dtype=torch.float32), alpha=inv)
            self.options.lap("db")

    def grads(self) -> HeadGrads:
        return HeadGrads(self.dh, self.dw, self.db, fp32_until_backward=self.fp16)


def _scatter(values: Tensor, rows: Tensor, n: int) -> Tensor:
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out


def single_pass_logprobs(head: LMHead, options: HeadOptions) -> TokenOutputs:
    """Per-token ``(logprob, entropy, lse)`` ``[N]`` fp32 (0 for ignored tokens): ``2 N H V`` flops."""
    rows = head.valid.nonzero()[:, 0]
    chunks = _Chunks(head, rows, options, with_grads=False)
    stats = tuple(torch.empty(chunks.n, dtype=torch.float32, device=head.hidden.device) for _ in range(3))
    for part, tokens, _, z in chunks:
        targets = head.targets[tokens]
        launch_logit_rows(MODE_STATS, z, None, targets, chunks.bias32, head.temperature, _parts(stats, part))
    return TokenOutputs(*(_scatter(t, rows, head.n_tokens) for t in stats))


def single_pass_backward(
    head: LMHead, lse: Tensor, entropy: Tensor | None, grads: UpstreamGrads, options: HeadOptions
) -> HeadGrads:
    """``(dh, dW, db)`` from per-token upstream grads (the second pass of a log-prob backward or ``gspo``)."""
    rows = head.valid.nonzero()[:, 0]
    chunks = _Chunks(head, rows, options, with_grads=True)
    g_l = grads.logprob.float()[rows]
    g_h = grads.entropy.float()[rows] if grads.entropy is not None else None
    stats = (lse, lse, lse) if entropy is None else (lse, entropy, lse)
    stats = tuple(t.float()[rows].contiguous() for t in stats)
    for part, tokens, h_c, z in chunks:
        chunk_grads = (g_l[part], None if g_h is None else g_h[part])
        launch_logit_rows(
            MODE_GRADS,
            z,
            chunks.dz_buffer(z),
            head.targets[tokens],
            chunks.bias32,
            head.temperature,
            _parts(stats, part),
            grads=chunk_grads,
        )
        chunks.add(tokens, h_c, z)
    return chunks.grads()


def single_pass_loss(
    head: LMHead, problem: TokenLossProblem, options: HeadOptions
) -> tuple[TokenOutputs, HeadGrads]:
    """The fused loss in one pass over the vocabulary: per-token results and ``(dh, dW, db)``."""
    rows = problem.keep.nonzero()[:, 0]
    chunks = _Chunks(head, rows, options, with_grads=True)
    device, compute = head.hidden.device, problem.old.dtype
    stats = tuple(torch.empty(chunks.n, dtype=torch.float32, device=device) for _ in range(3))
    per_token = dict(old=problem.old, ref=problem.ref, adv=problem.adv, weight=problem.weight)
    per_token["rollout_weight"] = problem.rollout_weight
    inputs = {name: None if t is None else t[rows].contiguous() for name, t in per_token.items()}
    outputs = {name: torch.empty(chunks.n, dtype=compute, device=device) for name in ("loss", "kl", "ratio")}
    outputs["zone"] = torch.empty(chunks.n, dtype=torch.int8, device=device)
    options.lap("prepare")
    for part, tokens, h_c, z in chunks:
        loss = {name: None if t is None else t[part] for name, t in {**inputs, **outputs}.items()}
        loss.update(config=problem.config, entropy_coef=problem.entropy_coef)
        launch_logit_rows(
            MODE_LOSS,
            z,
            chunks.dz_buffer(z),
            head.targets[tokens],
            chunks.bias32,
            head.temperature,
            _parts(stats, part),
            loss=loss,
        )
        options.lap("row_kernel")
        chunks.add(tokens, h_c, z)
    n = head.n_tokens
    scattered = {name: _scatter(t, rows, n) for name, t in outputs.items()}
    return TokenOutputs(*(_scatter(t, rows, n) for t in stats), **scattered), chunks.grads()


def _parts(tensors: tuple[Tensor, ...], part: slice) -> tuple[Tensor, ...]:
    return tuple(t[part] for t in tensors)
