"""PyTorch path of the fused linear log-probs: the same math as the Triton kernels, chunked.

For CPU tensors (and any device when ``backend="torch"``). Logits ``z = (h @ W.T + b) / T`` exist only
one ``[token_chunk, vocab_chunk]`` block at a time (``chunk_elements`` elements; `rpg_kernels.fused`
derives it from ``workspace_bytes``, `DEFAULT_CHUNK_ELEMENTS` = 16M by default), so the workspace does not
grow with ``N * V``. Blocks hold whole vocabulary rows unless ``MIN_TOKENS_PER_CHUNK`` rows exceed the
budget; then vocabulary chunks are merged. A block's elementwise passes run on sub-blocks of about
`ROW_GROUP_ELEMENTS` logits (two extra 2 MiB scratch buffers), which stay in cache between passes.
Accumulation is fp32 (fp64 for fp64 inputs, which ``gradcheck`` uses).

Per token (docs/MATH.md §6)::

    lse = log sum exp(z),  logprob = z[y] - lse,  entropy = -sum p * log p
    dz  = g_l * (onehot(y) - p) - g_H * p * (log p + entropy)
    dh  = dz @ W / T,  dW = dz.T @ h / T,  db = sum_n dz / T

Three entry points: `chunked_forward` (per-token outputs), `chunked_backward` (recomputes the logits
from the saved ``lse``), and `chunked_forward_backward`, the single pass the fused loss uses where
`single_pass_fits`: each token chunk's logits are computed once, whole vocabulary rows at a time, its
per-token upstream grads come from a callback as soon as its log-probs exist, and the gradients follow
from the same block (6 N H V flops instead of 8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from rpg_kernels.ops.lm_head import HeadGrads, LMHead, UpstreamGrads

# The default block, 64 MiB in fp32 (`rpg_kernels.ops.lm_head.TORCH_WORKSPACE_BYTES`): 512 rows of a 32k
# vocabulary, whole rows up to V = 262144 (Qwen, Llama 3, Gemma 3). Large blocks make the dW updates
# rank-512 GEMMs (each update reads and writes all of dW: rank-128 ones cost 20 % more time on CPU).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
MIN_TOKENS_PER_CHUNK = 64
ROW_GROUP_ELEMENTS = 1 << 19  # 2 MiB of fp32 logits: a sub-block's passes stay in cache

# (positions of this token chunk, logprob [n], entropy [n]) -> (g_l [n], g_H [n] | None)
TokenGrads = Callable[[slice | Tensor, Tensor, Tensor], tuple[Tensor, Tensor | None]]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_sizes(n_tokens: int, vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` with ``token_chunk * vocab_chunk <= max(chunk_elements, 64)``."""
    chunk_elements = max(int(chunk_elements), MIN_TOKENS_PER_CHUNK)
    vocab_chunk = min(vocab, max(1, chunk_elements // MIN_TOKENS_PER_CHUNK))
    token_chunk = max(1, min(n_tokens, chunk_elements // vocab_chunk))
    return token_chunk, vocab_chunk


def single_pass_fits(vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> bool:
    """Whether blocks of whole vocabulary rows fit the budget: ``MIN_TOKENS_PER_CHUNK`` rows of them
    (fewer rows make the ``dW`` updates dominate; the fused loss then takes two vocabulary-chunked
    passes)."""
    return MIN_TOKENS_PER_CHUNK * vocab <= chunk_elements


def single_pass_token_chunk(n_tokens: int, vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> int:
    """Tokens per block of whole rows: as many as ``chunk_elements`` hold (at least one)."""
    return max(1, min(n_tokens, int(chunk_elements) // vocab))


class _Head:
    """What the entry points share: the LM head in the accumulation dtype ``acc`` with ``1/T`` folded
    into the small operands (``logits(h, cols) = (h/T) @ W[cols].T + b[cols]/T``), the chunk sizes, and
    the rows that run: tokens with a target (and, for the loss, masked in), gathered so that padding
    costs nothing and whatever a masked-out hidden row holds (NaN included) never reaches a product.
    ``whole_rows``: the single pass's chunking (`single_pass_token_chunk`)."""

    def __init__(
        self,
        head: LMHead,
        keep: Tensor | None = None,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        whole_rows: bool = False,
    ):
        self.head = head
        self.acc = compute_dtype(head.hidden.dtype)
        self.inv_t = 1.0 / head.temperature
        self.weight = head.weight.to(self.acc)
        self.bias = head.bias.to(self.acc) * self.inv_t if head.bias is not None else None
        runs = head.valid if keep is None else head.valid & keep
        self.all_rows = bool(runs.all())
        self.rows = None if self.all_rows else runs.nonzero()[:, 0]
        self.n_rows = head.n_tokens if self.all_rows else self.rows.numel()
        self.vocab = head.vocab
        if whole_rows:
            self.token_chunk = single_pass_token_chunk(self.n_rows, self.vocab, chunk_elements)
            self.vocab_chunk = self.vocab
        else:
            self.token_chunk, self.vocab_chunk = chunk_sizes(self.n_rows, self.vocab, chunk_elements)

    def token_chunks(self) -> Iterator[tuple[slice | Tensor, Tensor, Tensor]]:
        """``(token positions, hidden[positions] in acc, targets[positions])`` per chunk of running rows:
        positions are a slice when every row runs, else an index tensor."""
        for n0 in range(0, self.n_rows, self.token_chunk):
            part = slice(n0, n0 + self.token_chunk)
            tokens = part if self.all_rows else self.rows[part]
            yield tokens, self.head.hidden[tokens].to(self.acc), self.head.targets[tokens]

    def vocab_chunks(self) -> Iterator[tuple[int, slice]]:
        """``(first vocabulary row, rows)`` per vocabulary chunk."""
        for v0 in range(0, self.vocab, self.vocab_chunk):
            yield v0, slice(v0, v0 + self.vocab_chunk)

    def logits(self, h: Tensor, cols: slice, out: Tensor | None = None) -> Tensor:
        """``[n, cols]`` logits of the hidden rows ``h``, into ``out[:n]`` when given (a reused block
        buffer: a fresh large allocation pays its page faults on every block)."""
        h_scaled = h * self.inv_t if self.inv_t != 1.0 else h
        weight = self.weight[cols].T
        out = None if out is None else out[: h.shape[0]]
        if self.bias is None:
            return torch.mm(h_scaled, weight, out=out)
        return torch.addmm(self.bias[cols], h_scaled, weight, out=out)

    def per_token(self) -> Tensor:
        """A zero ``[N]`` vector in the accumulation dtype (ignored and masked-out tokens keep 0)."""
        return torch.zeros(self.head.n_tokens, dtype=self.acc, device=self.head.hidden.device)


def _log_softmax_(z: Tensor) -> tuple[Tensor, Tensor]:
    """In place, ``z [n, v]`` becomes ``log softmax(z)``; returns ``(softmax [n, v], lse [n])``."""
    row_max = z.amax(dim=1, keepdim=True)
    z.sub_(row_max)
    p = torch.exp(z)
    sumexp = p.sum(dim=1, keepdim=True)
    log_sumexp = sumexp.log()
    z.sub_(log_sumexp)
    p.div_(sumexp)
    return p, (row_max + log_sumexp)[:, 0]


def _logsumexp_(z: Tensor) -> Tensor:
    """``log sum exp(z)`` per row of ``z [n, v]``, using ``z`` as scratch (faster than torch.logsumexp)."""
    row_max = z.amax(dim=1, keepdim=True)
    return (row_max + z.sub_(row_max).exp_().sum(dim=1, keepdim=True).log_())[:, 0]


def _entropy(p: Tensor, log_p: Tensor) -> Tensor:
    """``-sum p * log p`` per row."""
    return (p * log_p).sum(dim=1).neg_()


def _target_logits(z: Tensor, y: Tensor, v0: int) -> Tensor:
    """``z[n, y_n - v0]`` where ``y_n`` falls in this vocabulary chunk, else 0."""
    in_chunk = (y >= v0) & (y < v0 + z.shape[1])
    picked = z.gather(1, (y - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    return torch.where(in_chunk, picked, 0.0)


def _logit_grads_(
    p: Tensor,
    log_p: Tensor | None,
    y: Tensor,
    v0: int,
    g_l: Tensor,
    g_h: Tensor | None,
    entropy: Tensor | None,
    inv_t: float,
) -> Tensor:
    """``dz / T`` of the module docstring for one block, written over ``p`` (or ``log_p`` with entropy).

    ``p``, ``log_p`` ``[n, v]`` are the block's softmax and log-softmax; ``g_l``, ``g_h``, ``entropy``
    ``[n]``. Returns the block gradient ``[n, v]`` (a buffer of the inputs, reused).
    """
    if g_h is None:
        dz = p.mul_((g_l * -inv_t)[:, None])
    else:
        dz = log_p.add_(entropy[:, None]).mul_((g_h * -inv_t)[:, None]).add_((g_l * -inv_t)[:, None])
        dz.mul_(p)
    in_chunk = (y >= v0) & (y < v0 + dz.shape[1])
    rows = in_chunk.nonzero()[:, 0]
    dz[rows, y[rows] - v0] += g_l[rows] * inv_t
    return dz


class _GradAccumulator:
    """``dh [N, H]``, ``dW [V, H]``, ``db [V]`` in the accumulation dtype, filled block by block."""

    def __init__(self, head: LMHead, acc: torch.dtype, need: tuple[bool, bool, bool]):
        need_hidden, need_weight, need_bias = need
        hidden, weight, bias = head.hidden, head.weight, head.bias
        self.dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        make_db = need_bias and bias is not None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if make_db else None
        self.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)

    def add(self, dz: Tensor, h: Tensor, w: Tensor, tokens: slice | Tensor, cols: slice) -> None:
        """Adds the block ``dz [n, v]`` (already divided by T) for hidden rows ``h`` and weight rows ``w``."""
        if self.dh is not None:
            if isinstance(tokens, slice):
                self.dh[tokens].addmm_(dz, w)
            else:
                self.dh.index_add_(0, tokens, dz @ w)
        if self.dw is not None:
            self.dw[cols].addmm_(dz.T, h)
        if self.db is not None:
            self.db[cols] += dz.sum(dim=0)

    def result(self) -> HeadGrads:
        """``(dh, dW, db)`` in the input dtypes (None where not needed)."""
        grads = (
            None if g is None else g.to(dtype) for g, dtype in zip((self.dh, self.dw, self.db), self.dtypes)
        )
        return HeadGrads(*grads)


def chunked_forward(
    head: LMHead, with_entropy: bool = False, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-token ``(logprob, lse, entropy | None)`` ``[N]`` in the accumulation dtype (see module doc);
    0 for ignored tokens.

    Blocks of whole rows (when ``MIN_TOKENS_PER_CHUNK`` rows fit ``chunk_elements``) take the single
    pass's row statistics; otherwise vocabulary chunks ``c`` are merged at the end:
    ``lse = logsumexp_c lse_c`` and, with ``a_c = exp(lse_c - lse)``,
    ``entropy = sum_c a_c * (entropy_c + lse - lse_c)``.
    """
    run = _Head(head, chunk_elements=chunk_elements)
    logprob, lse = run.per_token(), run.per_token()
    entropy = run.per_token() if with_entropy else None
    if run.vocab_chunk == run.vocab:  # whole rows: the statistics in cache-sized sub-blocks
        block, scratch, group = _row_buffers(run)
        for tokens, h, y in run.token_chunks():
            stats = _row_statistics_(run.logits(h, slice(0, run.vocab), out=block), y, scratch, group)
            logprob[tokens], lse[tokens] = stats.logprob, stats.lse
            if with_entropy:
                entropy[tokens] = stats.entropy
        return logprob, lse, entropy
    for tokens, h, y in run.token_chunks():
        target_logit = torch.zeros(h.shape[0], dtype=run.acc, device=h.device)
        chunk_lse, chunk_entropy = [], []
        for v0, cols in run.vocab_chunks():
            z = run.logits(h, cols)
            target_logit += _target_logits(z, y, v0)
            if with_entropy:
                p, block_lse = _log_softmax_(z)
                chunk_entropy.append(_entropy(p, z))
            else:
                block_lse = _logsumexp_(z)
            chunk_lse.append(block_lse)
        block_lse = torch.stack(chunk_lse)
        row_lse = torch.logsumexp(block_lse, dim=0)
        lse[tokens] = row_lse
        logprob[tokens] = target_logit - row_lse
        if with_entropy:
            share = torch.exp(block_lse - row_lse)
            entropy[tokens] = (share * (torch.stack(chunk_entropy) + (row_lse - block_lse))).sum(dim=0)
    return logprob, lse, entropy


def chunked_backward(
    head: LMHead,
    lse: Tensor,
    entropy: Tensor | None,
    grads: UpstreamGrads,
    need: tuple[bool, bool, bool] = (True, True, True),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> HeadGrads:
    """``(dh [N, H], dW [V, H], db [V] | None)`` in the input dtypes from per-token upstream grads ``[N]``.

    ``grads.entropy`` (with ``entropy``) may be None. Ignored tokens get no gradient whatever their grads.
    """
    run = _Head(head, chunk_elements=chunk_elements)
    acc = run.acc
    g_l = grads.logprob.to(acc)
    g_h = grads.entropy.to(acc) if grads.entropy is not None else None
    entropy = entropy.to(acc) if g_h is not None else None
    lse = lse.to(acc)

    out = _GradAccumulator(head, acc, need)
    for tokens, h, y in run.token_chunks():
        for v0, cols in run.vocab_chunks():
            log_p = run.logits(h, cols).sub_(lse[tokens][:, None])
            p = torch.exp(log_p) if g_h is not None else log_p.exp_()
            dz = _logit_grads_(
                p,
                log_p,
                y,
                v0,
                g_l[tokens],
                None if g_h is None else g_h[tokens],
                None if entropy is None else entropy[tokens],
                run.inv_t,
            )
            out.add(dz, h, run.weight[cols], tokens, cols)
    return out.result()


def chunked_forward_backward(
    head: LMHead,
    keep: Tensor,
    token_grads: TokenGrads,
    need: tuple[bool, bool, bool] = (True, True, True),
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> HeadGrads:
    """One pass: ``(dh, dW, db)``; each block's logits are computed once.

    ``keep [N]``: the tokens of the loss (the others get no log-prob and no gradient).
    ``token_grads(tokens, logprob, entropy)`` receives each block's positions (a slice or an index tensor
    into the ``N`` tokens) and log-probs / entropies, and returns their upstream grads
    ``(g_l, g_H | None)``; it may not depend on other blocks. Blocks of `single_pass_token_chunk`
    tokens (whole vocabulary rows, up to ``chunk_elements`` logits, at least one row).

    A block's elementwise work runs on sub-blocks of about `ROW_GROUP_ELEMENTS` logits, which stay in
    cache between their passes, while the GEMMs see the whole block (a large ``K`` for ``dW``).
    """
    run = _Head(head, keep, chunk_elements, whole_rows=True)
    acc, all_cols = run.acc, slice(0, run.vocab)
    out = _GradAccumulator(head, acc, need)
    block, scratch, group = _row_buffers(run)
    for tokens, h, y in run.token_chunks():
        z = run.logits(h, all_cols, out=block)
        stats = _row_statistics_(z, y, scratch, group)
        g_l, g_h = token_grads(tokens, stats.logprob, stats.entropy)
        _logit_grads_from_stats_(
            z, y, stats, g_l.to(acc), None if g_h is None else g_h.to(acc), run.inv_t, scratch, group
        )
        out.add(z, h, run.weight, tokens, all_cols)
    return out.result()


def _row_buffers(run: _Head) -> tuple[Tensor, Tensor, int]:
    """``(block [token_chunk, V], scratch [2, group, V], group)`` for whole-row blocks: the logits block,
    reused by every token chunk, and the sub-blocks' two scratch buffers of ``group`` rows (allocated
    once: a fresh large allocation pays its page faults every time)."""
    device = run.head.hidden.device
    group = max(1, min(ROW_GROUP_ELEMENTS // run.vocab, run.token_chunk))
    block = torch.empty((run.token_chunk, run.vocab), dtype=run.acc, device=device)
    return block, torch.empty((2, group, run.vocab), dtype=run.acc, device=device), group


@dataclass
class _RowStats:
    """Per-row statistics of a block, ``[n]``: ``log_sum`` is ``log sum exp(z - max)``."""

    logprob: Tensor
    entropy: Tensor
    log_sum: Tensor
    lse: Tensor


def _row_statistics_(z: Tensor, y: Tensor, scratch: Tensor, group: int) -> _RowStats:
    """Log-prob and entropy of each row of ``z [n, V]``, sub-block by sub-block; ``z`` becomes
    ``z - max`` per row (in place)."""
    n = z.shape[0]
    logprob, entropy, log_sum, lse = (torch.empty(n, dtype=z.dtype, device=z.device) for _ in range(4))
    target = z.gather(1, y[:, None])[:, 0]
    for r0 in range(0, n, group):
        rows = slice(r0, r0 + group)
        zr = z[rows]
        row_max = zr.amax(dim=1, keepdim=True)
        zr.sub_(row_max)
        e = torch.exp(zr, out=scratch[0, : zr.shape[0]])
        s = e.sum(dim=1)
        t = torch.mul(e, zr, out=scratch[1, : zr.shape[0]]).sum(dim=1)  # sum e (z - max); bmm is 10x slower
        ls = s.log()
        log_sum[rows] = ls
        lse[rows] = row_max[:, 0] + ls
        logprob[rows] = target[rows] - row_max[:, 0] - ls  # (z_y - max) - log s: exact at |z| ~ 1e3
        entropy[rows] = ls - t / s
    return _RowStats(logprob, entropy, log_sum, lse)


def _logit_grads_from_stats_(
    z: Tensor,
    y: Tensor,
    stats: _RowStats,
    g_l: Tensor,
    g_h: Tensor | None,
    inv_t: float,
    scratch: Tensor,
    group: int,
) -> None:
    """Overwrite ``z`` (holding ``z - max``) with ``dz / T``, sub-block by sub-block.

    With ``p = e / s``, ``e = exp(z - max)``, ``log p = (z - max) - log s``::

        dz = g_l onehot - p (g_l + g_H (log p + H)) = g_l onehot - e (a + b (z - max))
        a  = (g_l + g_H (H - log s)) / s,   b = g_H / s
    """
    inv_s = torch.exp(-stats.log_sum)
    a = g_l * inv_s if g_h is None else (g_l + g_h * (stats.entropy - stats.log_sum)) * inv_s
    a = a * -inv_t
    b = None if g_h is None else g_h * inv_s * -inv_t
    for r0 in range(0, z.shape[0], group):
        rows = slice(r0, r0 + group)
        zr = z[rows]
        e = torch.exp(zr, out=scratch[0, : zr.shape[0]])
        if b is None:
            torch.mul(e, a[rows, None], out=zr)
        else:
            zr.mul_(b[rows, None]).add_(a[rows, None]).mul_(e)
    z[torch.arange(z.shape[0], device=z.device), y] += g_l * inv_t
