"""Triton forward: hidden states -> per-token log-prob, log-sum-exp and entropy, without [N, V] logits.

Logits ``z = (h @ W.T + b) / T`` are built one ``[BLOCK_N, BLOCK_V]`` tile at a time with ``tl.dot``
(fp32 accumulation) and folded into running per-token statistics (fp32), relative to the running max
``m`` so that logits of any magnitude stay finite::

    s = sum_v exp(z_v - m)                  (sum-exp)
    t = sum_v exp(z_v - m) * (z_v - m)      (for the entropy)
    lse = m + log(s),   entropy = log(s) - t / s,   logprob = z[y] - lse

A program owns ``BLOCK_N`` tokens and one of ``num_splits`` vocabulary slices; the slices' partial
``(m, s, t, z[y])`` are combined in ``combine_partials`` (a few [num_splits, N] tensor ops). Programs
are ordered vocabulary-split fastest, so the ``num_splits >= 4`` programs of one token block run side by
side and read its hidden block from L2, not once per slice from HBM.

This is the ``method="fused"`` forward (no ``[C, V]`` chunk at all); the default on CUDA is the single
pass (`rpg_kernels.ops.single_pass`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpg_kernels.ops.lm_head import LMHead
from rpg_kernels.ops.tile_configs import launch

# Start value of the running max: finite, so that "m_old - m_new" never gives inf - inf.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,
    offs_v,
    rows_ok,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``(h[offs_n] @ W[offs_v].T + b[offs_v]) * inv_temperature`` as a ``[BLOCK_N, BLOCK_V]`` fp32 tile.

    ``rows_ok [BLOCK_N]``: rows that are real tokens with a target; the others read ``h = 0``, so whatever
    their hidden state holds (NaN included) never enters a product. ``bias_ptr`` points to fp32 ``[V]``
    (zeros when the model has no bias). fp32 operands use exact (``"ieee"``) products, not TF32;
    fp16/bf16 operands run on the tensor cores (``wgmma`` on sm_90).
    """
    mask_n = rows_ok
    mask_v = offs_v < V
    rows_h = offs_n.to(tl.int64) * stride_hn
    rows_w = offs_v.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        h_mask = mask_n[:, None] & mask_h[None, :]
        w_mask = mask_v[:, None] & mask_h[None, :]
        h = tl.load(hidden_ptr + rows_h[:, None] + offs_h[None, :], mask=h_mask, other=0.0)
        w = tl.load(weight_ptr + rows_w[:, None] + offs_h[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    b = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0)
    return (acc + b[None, :]) * inv_temperature


@triton.jit
def linear_logprobs_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    part_max_ptr,
    part_sumexp_ptr,
    part_tsum_ptr,
    part_target_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    num_splits,
    n_bucket,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Partial statistics of one (token block, vocabulary slice); outputs are ``[num_splits, N]`` fp32.

    ``n_bucket`` (unused here) is the power-of-two bucket of ``N`` the autotuner keys on.
    """
    pid = tl.program_id(0)
    pid_n = pid // num_splits
    split = pid % num_splits
    v_per_split = tl.cdiv(tl.cdiv(V, num_splits), BLOCK_V) * BLOCK_V
    v_start = split * v_per_split
    v_end = tl.minimum(V, v_start + v_per_split)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    target = tl.load(targets_ptr + offs_n, mask=mask_n, other=-1)

    run_max = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    run_sumexp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_tsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            offs_n,
            offs_v,
            (offs_n < N) & (target >= 0),
            N,
            V,
            H,
            stride_hn,
            stride_wv,
            inv_temperature,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
        z = tl.where(mask_v[None, :], z, _NEG_BIG)  # exp -> 0, and 0 * shifted stays 0 (no inf * 0)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)
        shifted = z - new_max[:, None]
        e = tl.exp(shifted)
        if WITH_ENTROPY:
            run_tsum = alpha * (run_tsum + (run_max - new_max) * run_sumexp) + tl.sum(e * shifted, axis=1)
        run_sumexp = run_sumexp * alpha + tl.sum(e, axis=1)
        run_max = new_max

    out = split.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + out, run_max, mask=mask_n)
    tl.store(part_sumexp_ptr + out, run_sumexp, mask=mask_n)
    tl.store(part_target_ptr + out, target_logit, mask=mask_n)
    if WITH_ENTROPY:
        tl.store(part_tsum_ptr + out, run_tsum, mask=mask_n)


def fp32_bias(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    """The bias as contiguous fp32 ``[V]`` (zeros when None): one kernel variant serves both cases."""
    if bias is None:
        return torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    return bias.to(torch.float32).contiguous()


def aot_variants(dtypes: tuple[str, ...] = ("fp16", "bf16", "fp32")):
    """Yield ``(family, kernel, types, constexprs)`` for every variant this module launches (tiles aside)."""
    for dtype in dtypes:
        for with_entropy in (False, True):
            types = {
                "hidden_ptr": f"*{dtype}",
                "weight_ptr": f"*{dtype}",
                "bias_ptr": "*fp32",
                "targets_ptr": "*i64",
                "part_max_ptr": "*fp32",
                "part_sumexp_ptr": "*fp32",
                "part_tsum_ptr": "*fp32",
                "part_target_ptr": "*fp32",
                "inv_temperature": "fp32",
            }
            yield "forward", linear_logprobs_forward_kernel, types, {"WITH_ENTROPY": with_entropy}


MIN_SPLITS = 4  # programs of one token block that share its hidden block through L2


def num_vocab_splits(n_tokens: int, vocab: int, device: torch.device) -> int:
    """Vocabulary slices per token block: at least `MIN_SPLITS` (each of at least 256 columns), more when
    ``N`` is too small to fill the GPU."""
    if device.type != "cuda":
        return 2 if vocab > 128 else 1  # the interpreter: exercise the combine on all but tiny V
    n_blocks = triton.cdiv(n_tokens, 64)
    target_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = max(MIN_SPLITS, triton.cdiv(target_programs, n_blocks))
    return max(1, min(triton.cdiv(vocab, 256), wanted))


def n_bucket(n_tokens: int) -> int:
    """The autotune bucket of ``N``: the next power of two (tiles tuned at N=128 are not those of N=64k)."""
    return 1 << max(0, (n_tokens - 1).bit_length())


def combine_partials(
    part_max: torch.Tensor,
    part_sumexp: torch.Tensor,
    part_tsum: torch.Tensor | None,
    part_target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge ``[S, N]`` per-slice statistics into ``(logprob, lse, entropy | None)``, each ``[N]`` fp32."""
    run_max = part_max.amax(dim=0)
    scale = torch.exp(part_max - run_max)  # empty slices: exp(-1e30 - m) = 0
    sumexp = (part_sumexp * scale).sum(dim=0)
    log_sumexp = torch.log(sumexp)
    lse = run_max + log_sumexp
    logprob = part_target.sum(dim=0) - lse
    entropy = None
    if part_tsum is not None:
        tsum = (scale * (part_tsum + (part_max - run_max) * part_sumexp)).sum(dim=0)
        entropy = log_sumexp - tsum / sumexp
    return logprob, lse, entropy


def linear_logprobs_forward(
    head: LMHead, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token ``(logprob, lse, entropy | None)`` (fp32, ``[N]``) of ``z = (hidden @ weight.T + bias) / T``.

    Tokens with ``targets == ignore_index`` get logprob 0 and entropy 0 (their ``lse`` is still computed).
    Inputs are assumed validated (``rpg_kernels.fused`` does it).
    """
    hidden, weight = head.hidden, head.weight
    targets = torch.where(head.valid, head.targets, -1)  # the kernels' mark of a token without a target
    n_tokens, hidden_size = hidden.shape
    vocab = weight.shape[0]
    splits = num_vocab_splits(n_tokens, vocab, hidden.device)
    n_stats = 4 if with_entropy else 3
    part = torch.empty((n_stats, splits, n_tokens), dtype=torch.float32, device=hidden.device)
    part_max, part_sumexp, part_target = part[0], part[1], part[2]
    part_tsum = part[3] if with_entropy else part_max  # unused pointer when no entropy
    grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * splits,)
    launch(
        linear_logprobs_forward_kernel,
        "forward",
        grid,
        hidden,
        weight,
        fp32_bias(head.bias, weight),
        targets,
        part_max,
        part_sumexp,
        part_tsum,
        part_target,
        n_tokens,
        vocab,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        splits,
        n_bucket(n_tokens),
        1.0 / head.temperature,
        device=hidden.device,
        dtype=hidden.dtype,
        WITH_ENTROPY=with_entropy,
    )
    part_tsum = part[3] if with_entropy else None
    logprob, lse, entropy = combine_partials(part_max, part_sumexp, part_tsum, part_target)
    valid = head.valid
    logprob = torch.where(valid, logprob, 0.0)
    if entropy is not None:
        entropy = torch.where(valid, entropy, 0.0)
    return logprob, lse, entropy
