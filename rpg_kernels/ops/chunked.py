"""PyTorch path of the fused linear log-probs: the same math as the Triton kernels, chunked.

For CPU tensors (and any device when ``backend="torch"``). Logits ``z = (h @ W.T + b) / T`` exist only
one ``[token_chunk, vocab_chunk]`` block at a time (``chunk_elements`` elements, default 4M), so the
workspace does not grow with ``N * V``; a token chunk costs one matmul per vocabulary chunk (a single
one unless ``V`` is huge). Accumulation is fp32 (fp64 for fp64 inputs, which ``gradcheck`` uses).

Per token, with running max ``m`` over the vocabulary chunks (SPEC §6)::

    lse = m + log(sum exp(z - m)),  logprob = z[y] - lse,  entropy = -sum p * log p
    dz  = g_l * (onehot(y) - p) - g_H * p * (log p + entropy)
    dh  = dz @ W / T,  dW = dz.T @ h / T,  db = sum_n dz / T
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 22
MIN_TOKENS_PER_CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_sizes(n_tokens: int, vocab: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[int, int]:
    """``(token_chunk, vocab_chunk)`` with ``token_chunk * vocab_chunk <= max(chunk_elements, 64)``."""
    chunk_elements = max(int(chunk_elements), MIN_TOKENS_PER_CHUNK)
    vocab_chunk = min(vocab, max(1, chunk_elements // MIN_TOKENS_PER_CHUNK))
    token_chunk = max(1, min(n_tokens, chunk_elements // vocab_chunk))
    return token_chunk, vocab_chunk


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    z = h @ weight.T
    if bias is not None:
        z += bias
    return z.mul_(inv_t)


def chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token ``(logprob, lse, entropy | None)`` ``[N]`` in the accumulation dtype (see module doc)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    weight_acc = weight.to(acc)
    bias_acc = bias.to(acc) if bias is not None else None
    token_chunk, vocab_chunk = chunk_sizes(n_tokens, vocab, chunk_elements)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)

    logprob = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logprob)
    entropy = torch.empty_like(logprob) if with_entropy else None
    for n0 in range(0, n_tokens, token_chunk):
        h = hidden[n0 : n0 + token_chunk].to(acc)
        y = safe_targets[n0 : n0 + token_chunk]
        run_max = torch.full((h.shape[0],), float("-inf"), dtype=acc, device=h.device)
        sumexp = torch.zeros_like(run_max)
        tsum = torch.zeros_like(run_max)  # sum exp(z - m) * (z - m)
        target_logit = torch.zeros_like(run_max)
        for v0 in range(0, vocab, vocab_chunk):
            b = bias_acc[v0 : v0 + vocab_chunk] if bias_acc is not None else None
            z = _logits(h, weight_acc[v0 : v0 + vocab_chunk], b, inv_t)
            in_chunk = (y >= v0) & (y < v0 + z.shape[1])
            picked = z.gather(1, (y - v0).clamp(0, z.shape[1] - 1)[:, None])[:, 0]
            target_logit += torch.where(in_chunk, picked, 0.0)
            new_max = torch.maximum(run_max, z.amax(dim=1))
            alpha = torch.exp(run_max - new_max)
            z -= new_max[:, None]  # z is now z - m_new
            e = torch.exp(z)
            if with_entropy:
                shift = torch.where(sumexp > 0, run_max - new_max, 0.0)  # first chunk: -inf * 0
                tsum = alpha * (tsum + shift * sumexp) + (e * z).sum(dim=1)
            sumexp = sumexp * alpha + e.sum(dim=1)
            run_max = new_max
        log_sumexp = torch.log(sumexp)
        chunk_lse = run_max + log_sumexp
        rows = slice(n0, n0 + h.shape[0])
        lse[rows] = chunk_lse
        logprob[rows] = target_logit - chunk_lse
        if with_entropy:
            entropy[rows] = log_sumexp - tsum / sumexp
    logprob = torch.where(valid, logprob, 0.0)
    if entropy is not None:
        entropy = torch.where(valid, entropy, 0.0)
    return logprob, lse, entropy


def chunked_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    need_hidden: bool = True,
    need_weight: bool = True,
    need_bias: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dh [N, H], dW [V, H], db [V] | None)`` in the input dtypes from per-token upstream grads ``[N]``.

    ``grad_entropy`` (with ``entropy``) may be None. Ignored tokens get no gradient whatever their grads.
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden.dtype)
    inv_t = 1.0 / temperature
    weight_acc = weight.to(acc)
    bias_acc = bias.to(acc) if bias is not None else None
    token_chunk, vocab_chunk = chunk_sizes(n_tokens, vocab, chunk_elements)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    g_l = torch.where(valid, grad_logprob.to(acc), 0.0)
    with_entropy = grad_entropy is not None
    if with_entropy:
        g_h = torch.where(valid, grad_entropy.to(acc), 0.0)
        entropy = entropy.to(acc)
    lse = lse.to(acc)

    dh = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if need_hidden else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    db = torch.zeros(vocab, dtype=acc, device=weight.device) if (need_bias and bias is not None) else None
    for n0 in range(0, n_tokens, token_chunk):
        rows = slice(n0, n0 + token_chunk)
        h = hidden[rows].to(acc)
        y = safe_targets[rows]
        gl = g_l[rows][:, None]
        dh_chunk = torch.zeros_like(h) if need_hidden else None
        for v0 in range(0, vocab, vocab_chunk):
            cols = slice(v0, v0 + vocab_chunk)
            b = bias_acc[cols] if bias_acc is not None else None
            w = weight_acc[cols]
            dz = _logits(h, w, b, inv_t)
            dz -= lse[rows][:, None]  # log p
            p = torch.exp(dz)
            if with_entropy:
                dz += entropy[rows][:, None]
                dz *= g_h[rows][:, None]
                dz += gl
                dz *= p
            else:
                dz = torch.mul(p, gl, out=dz)
            dz.neg_()
            in_chunk = (y >= v0) & (y < v0 + w.shape[0])
            onehot_rows = in_chunk.nonzero()[:, 0]
            dz[onehot_rows, y[onehot_rows] - v0] += gl[onehot_rows, 0]
            dz *= inv_t
            if need_hidden:
                dh_chunk.addmm_(dz, w)
            if dw is not None:
                dw[cols].addmm_(dz.T, h)
            if db is not None:
                db[cols] += dz.sum(dim=0)
        if need_hidden:
            dh[rows] = dh_chunk
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
