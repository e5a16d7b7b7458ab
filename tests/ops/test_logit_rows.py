"""The single pass's Triton row kernel (interpreter on CPU) against float64 references, mode by mode.

The kernel takes an fp32 logits chunk (here built in float64 and rounded once, as cuBLAS's fp32 result
would be) and writes statistics, the per-token loss and ``dz``. It has no ``tl.dot``, so its bf16 ``dz``
stores are tested here too.
"""

import zlib

import pytest
import torch

from rpg_kernels import LossConfig
from rpg_kernels.loss.token_losses import token_losses
from rpg_kernels.ops.dispatch import triton_interpreter_enabled
from rpg_kernels.ops.logit_rows import MODE_GRADS, MODE_LOSS, MODE_STATS, launch_logit_rows
from rpg_kernels.ops.token_loss_epilogue import ZONE_DUAL, ZONE_HIGH, ZONE_LOW
from tests.loss.loss_reference import case_id, token_level_cases
from tests.ops.ops_reference import assert_close

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_enabled()),
    reason="needs CUDA or the Triton interpreter",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (seed, C, V): one row; V smaller than a block, not a multiple of it, one element; many rows.
SHAPES = [(0, 1, 5), (1, 7, 63), (2, 5, 64), (3, 13, 301), (4, 3, 1), (5, 40, 130)]


def make_rows(seed, rows, vocab, scale=3.0, bias=True, temperature=0.7):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    return z, b, targets, temperature


def reference_rows(z, b, targets, temperature, g_l=None, g_h=None):
    """float64 ``(logprob, entropy, lse, dz)`` with ``dz`` of ``sum(g_l * logprob + g_H * entropy)``."""
    logits = ((z if b is None else z + b) / temperature).requires_grad_(True)
    log_p = torch.log_softmax(logits, -1)
    logprob = log_p.gather(1, targets[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(-1)
    dz = None
    if g_l is not None:
        objective = (g_l.double() * logprob).sum() + (0 if g_h is None else (g_h.double() * entropy).sum())
        (dz,) = torch.autograd.grad(objective, logits)
        dz = dz / temperature  # the kernel's dz is d/d(raw row): the 1/T of z = (row + b) / T
    return logprob.detach(), entropy.detach(), torch.logsumexp(logits.detach(), -1), dz


def chunk(z, b, dz_dtype=torch.float32, in_place=False):
    """The kernel's fp32 chunk, its bias and its dz buffer."""
    z32 = z.float().to(DEVICE).contiguous()
    b32 = None if b is None else b.float().to(DEVICE)
    dz = z32 if in_place else torch.empty_like(z32, dtype=dz_dtype)
    return z32, b32, dz


def stats_buffers(rows):
    return tuple(torch.empty(rows, dtype=torch.float32, device=DEVICE) for _ in range(3))


@pytest.mark.parametrize("seed,rows,vocab", SHAPES)
def test_statistics_match_float64(seed, rows, vocab):
    z, b, targets, temperature = make_rows(seed, rows, vocab, bias=seed % 2 == 0)
    z32, b32, _ = chunk(z, b)
    stats = stats_buffers(rows)
    launch_logit_rows(MODE_STATS, z32, None, targets.to(DEVICE), b32, temperature, stats)
    logprob, entropy, lse, _ = reference_rows(
        z.float().double(), b if b is None else b.float().double(), targets, temperature
    )
    assert_close("logprob", stats[0], logprob, 1e-6, scale=lse.abs().max().item())
    assert_close("entropy", stats[1], entropy, 1e-6)
    assert_close("lse", stats[2], lse, 1e-6, scale=lse.abs().max().item())


@pytest.mark.parametrize("scale", [30.0, 1e3])
def test_statistics_of_huge_logits_stay_finite(scale):
    z, b, targets, temperature = make_rows(7, 9, 200, scale=scale, temperature=1.0)
    z32, b32, _ = chunk(z, b)
    stats = stats_buffers(9)
    launch_logit_rows(MODE_STATS, z32, None, targets.to(DEVICE), b32, temperature, stats)
    logprob, entropy, lse, _ = reference_rows(z.float().double(), b.float().double(), targets, temperature)
    assert all(torch.isfinite(t).all() for t in stats)
    assert_close("logprob", stats[0], logprob, 1e-6, scale=scale)
    assert_close("entropy", stats[1], entropy, 1e-3)


@pytest.mark.parametrize(
    "dz_dtype,in_place",
    [(torch.float32, True), (torch.float32, False), (torch.float16, False), (torch.bfloat16, False)],
    ids=["fp32-in-place", "fp32", "fp16", "bf16"],
)
@pytest.mark.parametrize("seed,rows,vocab", SHAPES[1:4])
def test_grads_mode_writes_dz(seed, rows, vocab, dz_dtype, in_place):
    z, b, targets, temperature = make_rows(seed, rows, vocab, bias=seed % 2 == 1)
    gen = torch.Generator().manual_seed(seed + 100)
    g_l, g_h = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    zr, br = z.float().double(), None if b is None else b.float().double()
    logprob, entropy, lse, dz_ref = reference_rows(zr, br, targets, temperature, g_l, g_h)
    z32, b32, dz = chunk(z, b, dz_dtype, in_place)
    stats = tuple(t.float().to(DEVICE) for t in (logprob, entropy, lse))
    grads = (g_l.to(DEVICE), g_h.to(DEVICE))
    launch_logit_rows(MODE_GRADS, z32, dz, targets.to(DEVICE), b32, temperature, stats, grads=grads)
    tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dz_dtype]
    assert dz.dtype == dz_dtype
    assert_close("dz", dz, dz_ref, tol)


@pytest.mark.parametrize("case", token_level_cases(), ids=case_id)
def test_loss_mode_matches_the_per_token_loss(case):
    """MODE_LOSS: log-prob, per-token loss, kl, ratio, zone and dz equal float64 autograd through the
    PyTorch per-token loss, with and without a reference and a rollout weight."""
    algo, overrides = case
    seed = zlib.crc32(case_id(case).encode())
    beta = 0.3 if overrides.get("kl_estimator") or algo.startswith("rpg") else 0.0
    config = LossConfig.preset(algo, beta=beta, **overrides)
    rows, vocab = 24, 77
    z, b, targets, temperature = make_rows(seed, rows, vocab, scale=2.0)
    gen = torch.Generator().manual_seed(seed)
    zr, br = z.float().double(), b.float().double()
    logprob, entropy, _, _ = reference_rows(zr, br, targets, temperature)
    old = (logprob + 0.5 * torch.randn(rows, generator=gen, dtype=torch.float64)).float().double()
    ref = (logprob + 0.3 * torch.randn(rows, generator=gen, dtype=torch.float64)).float().double()
    adv = torch.randn(rows, generator=gen, dtype=torch.float64).float().double()
    weight = torch.rand(rows, generator=gen, dtype=torch.float64).float().double() / rows
    rollout = torch.rand(rows, generator=gen, dtype=torch.float64).float().double() * 2
    entropy_coef = 0.05
    for with_ref, with_rollout in ((True, True), (False, False)):
        # float64 reference: the per-token loss of the row's log-prob, then dz by autograd
        logits = ((zr + br) / temperature).requires_grad_(True)
        log_p = torch.log_softmax(logits, -1)
        lp = log_p.gather(1, targets[:, None])[:, 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        keep = torch.ones(1, rows, dtype=torch.bool)
        reference_logprobs = ref[None] if with_ref else None
        rollout_weight = rollout[None] if with_rollout else None
        out = token_losses(lp[None], old[None], adv[None], keep, reference_logprobs, config, rollout_weight)
        total = (out.loss[0] * weight).sum() - entropy_coef * (ent * weight).sum()
        (dz_ref,) = torch.autograd.grad(total, logits)
        dz_ref = dz_ref / temperature

        z32, b32, dz = chunk(z, b, torch.float32, in_place=True)
        stats = stats_buffers(rows)
        outputs = {
            name: torch.empty(rows, dtype=torch.float32, device=DEVICE) for name in ("loss", "kl", "ratio")
        }
        outputs["zone"] = torch.empty(rows, dtype=torch.int8, device=DEVICE)
        loss = dict(
            old=old.float().to(DEVICE),
            ref=ref.float().to(DEVICE) if with_ref else None,
            adv=adv.float().to(DEVICE),
            weight=weight.float().to(DEVICE),
            rollout_weight=rollout.float().to(DEVICE) if with_rollout else None,
            config=config,
            entropy_coef=entropy_coef,
            **outputs,
        )
        launch_logit_rows(MODE_LOSS, z32, dz, targets.to(DEVICE), b32, temperature, stats, loss=loss)
        assert_close("logprob", stats[0], lp.detach(), 1e-6, scale=10.0)
        assert_close("entropy", stats[1], ent.detach(), 1e-6)
        assert_close("loss", outputs["loss"], out.loss[0].detach(), 1e-5, scale=1.0)
        assert_close("kl", outputs["kl"], out.kl[0], 1e-5, scale=1.0)
        assert_close("ratio", outputs["ratio"], out.ratio[0], 1e-5, scale=1.0)
        zone = torch.zeros(rows, dtype=torch.int8)
        for code, flags in (
            (ZONE_LOW, out.clip_low[0]),
            (ZONE_HIGH, out.clip_high[0]),
            (ZONE_DUAL, out.clip_dual[0]),
        ):
            zone = torch.where(flags, code, zone)
        assert torch.equal(outputs["zone"].cpu(), zone)
        assert_close("dz", dz, dz_ref, 1e-5)
        assert dz.abs().sum() > 0
