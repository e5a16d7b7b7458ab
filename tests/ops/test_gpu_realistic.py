"""Realistic size on a GPU: N=16384 tokens, H=4096, V=151936 (Qwen vocabulary), bf16 inputs, against
an fp32 reference that materialises logits chunk by chunk. Skipped without CUDA.

Checks: no NaN/Inf; relative error (Frobenius norm) <= 1e-2 for the loss, the log-probs and the grads of
hidden, weight, bias. Writes timings, peak memory and errors to ``$RPG_GPU_RESULTS``
(default ``tests/ops/results``) as ``gpu_realistic_<device>.json``.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

import rpg_kernels as rk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

N, H, V = 16384, 4096, 151936
REF_CHUNK = 1024
RESULTS = Path(os.environ.get("RPG_GPU_RESULTS", Path(__file__).with_name("results")))


def make_inputs(seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(N, H, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(V, H, device="cuda", generator=gen) * H**-0.5 * 4).to(torch.bfloat16)
    bias = (torch.randn(V, device="cuda", generator=gen) * 0.5).to(torch.bfloat16)
    targets = torch.randint(0, V, (N,), device="cuda", generator=gen)
    targets[:64] = -100
    mask = (targets != -100) & (torch.rand(N, device="cuda", generator=gen) > 0.1)
    old = -torch.rand(N, device="cuda", generator=gen) * 8
    adv = torch.randn(N, device="cuda", generator=gen)
    return hidden, weight, bias, targets, old, adv, mask


def chunked_fp32_reference(hidden, weight, bias, targets, old, adv, mask, config, entropy_coef):
    """fp32 loss, log-probs and grads with autograd, materialising [REF_CHUNK, V] logits at a time."""
    w = weight.float().requires_grad_()
    b = bias.float().requires_grad_()
    h = hidden.float()
    valid = targets != -100

    def per_token(hc, rows):
        log_p = torch.log_softmax(hc @ w.T + b, dim=-1)
        lp = log_p.gather(1, targets[rows].clamp(min=0)[:, None])[:, 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        return torch.where(valid[rows], lp, 0.0), torch.where(valid[rows], ent, 0.0)

    with torch.no_grad():
        parts = [per_token(h[i : i + REF_CHUNK], slice(i, i + REF_CHUNK)) for i in range(0, N, REF_CHUNK)]
    logprob = torch.cat([p[0] for p in parts]).requires_grad_()
    entropy = torch.cat([p[1] for p in parts]).requires_grad_()
    loss, _ = rk.rpg_loss(logprob, old, adv, mask, config=config, entropy=entropy, entropy_coef=entropy_coef)
    g_l, g_h = torch.autograd.grad(loss, (logprob, entropy))
    dh = torch.empty_like(h)
    for i in range(0, N, REF_CHUNK):
        rows = slice(i, i + REF_CHUNK)
        hc = h[rows].clone().requires_grad_()
        lp, ent = per_token(hc, rows)
        ((lp * g_l[rows]).sum() + (ent * g_h[rows]).sum()).backward()
        dh[rows] = hc.grad
    return loss.detach(), logprob.detach(), dh, w.grad, b.grad


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


@pytest.mark.parametrize("deterministic", [True, False])
def test_realistic_bf16_against_fp32_reference(deterministic):
    cfg = rk.LossConfig.preset("rpg")
    entropy_coef = 1e-3
    hidden, weight, bias, targets, old, adv, mask = make_inputs()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()

    def fused_step():
        h.grad = w.grad = b.grad = None
        loss, metrics = rk.fused_linear_rpg_loss(
            h,
            w,
            targets,
            old,
            adv,
            mask,
            config=cfg,
            bias=b,
            entropy_coef=entropy_coef,
            deterministic=deterministic,
        )
        loss.backward()
        return loss, metrics

    fused_step()  # autotuning + compilation
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss, metrics = fused_step()
    torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    peak_extra = torch.cuda.max_memory_allocated() - base

    with torch.no_grad():
        start = time.perf_counter()
        logprobs = rk.fused_linear_logprobs(h, w, targets, bias=b)
        torch.cuda.synchronize()
        logprobs_s = time.perf_counter() - start

    ref_loss, ref_logprob, ref_dh, ref_dw, ref_db = chunked_fp32_reference(
        hidden, weight, bias, targets, old, adv, mask, cfg, entropy_coef
    )
    errors = {
        "loss": abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()), 1e-30),
        "logprobs": rel_err(logprobs, ref_logprob),
        "grad_hidden": rel_err(h.grad, ref_dh),
        "grad_weight": rel_err(w.grad, ref_dw),
        "grad_bias": rel_err(b.grad, ref_db),
    }
    result = {
        "device": torch.cuda.get_device_name(),
        "shape": {"N": N, "H": H, "V": V, "dtype": "bf16"},
        "deterministic": deterministic,
        "loss_forward_backward_s": step_s,
        "logprobs_forward_s": logprobs_s,
        "peak_extra_memory_gib": peak_extra / 2**30,
        "rel_errors": errors,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tag = "det" if deterministic else "atomic"
    name = torch.cuda.get_device_name().replace(" ", "_")
    (RESULTS / f"gpu_realistic_{name}_{tag}.json").write_text(json.dumps(result, indent=2))

    for t in (loss, logprobs, h.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()
    for key, err in errors.items():
        assert err <= 1e-2, f"{key}: relative error {err:.3g} > 1e-2"
