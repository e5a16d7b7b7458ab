"""The Triton per-token loss epilogue against the PyTorch path (interpreter on CPU), and its
ahead-of-time compilation for sm_80 / sm_90."""

import zlib

import numpy as np
import pytest
import torch

from rpg_kernels import LossConfig
from rpg_kernels.config import KLS
from rpg_kernels.loss import loss_and_logprob_grads
from rpg_kernels.loss.aggregation import aggregation_weights
from rpg_kernels.loss.inputs import prepare_loss_inputs, validate_loss_inputs
from rpg_kernels.loss.token_losses import token_losses
from tests.loss.loss_reference import case_id, make_inputs, token_level_cases, value_and_grad

triton = pytest.importorskip("triton")
epilogue = pytest.importorskip("rpg_kernels.ops.token_loss_epilogue")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
METRICS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "ratio_max")


def grads_by(backend, logprobs, old, adv, mask, ref=None, config=None, num_items=None, **kwargs):
    """``(loss, dL/dl, dL/dH, metrics)`` by autograd (``"torch"``) or by the epilogue (``"triton"``)."""
    if backend == "torch":
        return loss_and_logprob_grads(logprobs, old, adv, mask, ref, config, num_items, **kwargs)
    entropy, entropy_coef = kwargs.get("entropy"), kwargs.get("entropy_coef", 0.0)
    raw = validate_loss_inputs(
        logprobs, old, adv, mask, ref, entropy, config=config, num_items=num_items, entropy_coef=entropy_coef
    )
    prepared = prepare_loss_inputs(raw)
    weights = aggregation_weights(prepared.mask, config.agg, num_items, prepared.dtype)
    loss, grad, grad_entropy, metrics = epilogue.epilogue_loss_and_grads(
        prepared, weights, config, prepared.logprobs, prepared.entropy, entropy_coef
    )
    grad_entropy = None if entropy is None else grad_entropy.to(entropy.dtype)
    return loss, grad.to(logprobs.dtype).reshape(logprobs.shape), grad_entropy, metrics


def to_device(t):
    return {k: None if v is None else v.to(DEVICE) for k, v in t.items()}


@pytest.mark.parametrize("case", token_level_cases(), ids=case_id)
def test_triton_backend_equals_torch_backend(case):
    algo, overrides = case
    seed = zlib.crc32(case_id(case).encode())
    beta = 0.3 if overrides.get("kl_estimator") or algo.startswith("rpg") else 0.0
    clip_c = {"grpo": 3.0}.get(algo)  # exercise the baselines' dual clip too
    extra = {} if clip_c is None else dict(clip_c=clip_c)
    cfg = LossConfig.preset(algo, beta=beta, **overrides, **extra)
    for dtype, with_ref, (batch, length) in [
        (torch.float64, True, (4, 37)),
        (torch.float64, False, (3, 5)),
        (torch.float32, True, (5, 29)),
        (torch.float32, False, (1, 1)),
    ]:
        _, t = make_inputs(seed, batch, length, with_ref=with_ref)
        t = {k: v if v is None or k == "mask" else v.to(dtype) for k, v in to_device(t).items()}
        args = (t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
        expected = grads_by("torch", *args)
        got = grads_by("triton", *args)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(got[0], expected[0], **tol)
        torch.testing.assert_close(got[1], expected[1], **tol)
        assert got[1].dtype == dtype and got[1].shape == t["lp"].shape and got[2] is None
        for key in METRICS:
            torch.testing.assert_close(got[3][key], expected[3][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize(
    "algo_mode",
    [
        ("rpg", "dual"),
        ("rpg_reinforce", "dual"),
        ("rpg_reinforce", "truncate"),
        ("grpo", "dual"),
        ("cispo", "dual"),
    ],
)
def test_per_token_outputs_and_zone_codes(algo_mode, block):
    """The kernel's per-token L, grad, zone codes, kl and ratio, over shapes that leave partial blocks."""
    algo, mode = algo_mode
    kl = dict(kl="rkl") if algo.startswith("rpg") else dict(kl_estimator="k3", clip_c=3.0)
    cfg = LossConfig.preset(algo, clip_mode=mode, beta=0.2, **kl)
    for batch, length in [(1, 1), (1, block), (2, block + 1), (3, 2 * block - 5)]:
        _, t = make_inputs(batch * 100 + length, batch, length, with_ref=True)
        t = to_device(t)
        weights = aggregation_weights(t["mask"], "seq-mean-token-sum", dtype=torch.float64)
        out = epilogue.token_loss_epilogue(
            t["lp"], t["lo"], t["a"], t["mask"], weights, cfg, t["lref"], block=block
        )
        keep = t["mask"]
        clean = [torch.where(keep, t[k], 0.0) for k in ("lp", "lo", "a", "lref")]
        x = clean[0].clone().requires_grad_(True)
        ref = token_losses(x, clean[1], clean[2], keep, clean[3], cfg)
        (grad,) = torch.autograd.grad((ref.loss * weights).sum(), x)
        torch.testing.assert_close(
            out.loss, torch.where(keep, ref.loss.detach(), 0.0), rtol=1e-12, atol=1e-14
        )
        torch.testing.assert_close(out.grad, grad, rtol=1e-12, atol=1e-14)
        zone = torch.zeros_like(keep, dtype=torch.int8)
        for code, flags in ((1, ref.clip_low), (2, ref.clip_high), (3, ref.clip_dual)):
            zone = torch.where(flags & keep, code, zone)
        assert out.zone.dtype == torch.int8 and torch.equal(out.zone, zone)
        torch.testing.assert_close(out.kl, torch.where(keep, ref.kl, 0.0), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out.ratio, torch.where(keep, ref.ratio, 0.0), rtol=1e-12, atol=1e-14)
        assert torch.isfinite(out.loss).all() and torch.isfinite(out.grad).all()


def test_zone_codes_cover_every_zone():
    """Guard: the inputs above visit the low, high and dual zones (codes 1, 2, 3)."""
    cfg = LossConfig.preset("rpg_reinforce", kl="urkl")
    _, t = make_inputs(5, 6, 40, with_ref=False)
    t = to_device(t)
    weights = aggregation_weights(t["mask"], "token-mean", dtype=torch.float64)
    out = epilogue.token_loss_epilogue(t["lp"], t["lo"], t["a"], t["mask"], weights, cfg, block=64)
    assert set(out.zone[t["mask"]].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("kl_clamp", [0.05, 1.0])
@pytest.mark.parametrize("algo", ["rpg", "rpg_reinforce", "grpo"])
def test_kl_clamp_against_reference(algo, kl_clamp):
    extra = dict(kl="urkl") if algo.startswith("rpg") else dict(kl_estimator="k3_is")
    cfg = LossConfig.preset(algo, beta=0.5, kl_clamp=kl_clamp, agg="token-mean", **extra)
    (lp, lo, lref, a, mask), t = make_inputs(31, 4, 23, with_ref=True)
    t = to_device(t)
    value, grad, _, _ = grads_by("triton", t["lp"], t["lo"], t["a"], t["mask"], t["lref"], cfg)
    as_dict = {
        f: getattr(cfg, f) for f in ("algo", "kl", "kl_estimator", "beta", "eps_low", "eps_high", "clip_c")
    }
    as_dict.update(clip_mode=cfg.clip_mode, kl_clamp=kl_clamp)
    values, grads = value_and_grad(as_dict, lp, lo, lref, a)
    n = mask.sum()
    np.testing.assert_allclose(value.item(), values[mask].sum() / n, rtol=1e-12)
    np.testing.assert_allclose(grad.cpu().numpy(), np.where(mask, grads, 0.0) / n, rtol=1e-11, atol=1e-14)


def test_mixed_dtypes_entropy_num_items_and_sequence_advantages():
    """bf16 log-probs with fp32 old/ref, [B] advantages, entropy bonus, a global num_items."""
    _, t = make_inputs(41, 5, 33, with_ref=True)
    t = to_device(t)
    cfg = LossConfig.preset("rpg_reinforce", agg="seq-mean-token-mean")
    entropy = torch.rand(5, 33, device=DEVICE).masked_fill(~t["mask"], float("nan"))
    args = (
        t["lp"].to(torch.bfloat16),
        t["lo"].float(),
        t["a"][:, 0].nan_to_num().float(),
        t["mask"],
        t["lref"].float(),
        cfg,
        7,
    )
    kwargs = dict(entropy=entropy, entropy_coef=0.03)
    expected = grads_by("torch", *args, **kwargs)
    got = grads_by("triton", *args, **kwargs)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=1e-9)
    for key in METRICS + ("entropy",):
        torch.testing.assert_close(got[3][key], expected[3][key], rtol=1e-5, atol=1e-6, msg=key)


def test_all_zero_mask_and_no_gspo_epilogue():
    _, t = make_inputs(43, 3, 9, with_ref=True)
    t = to_device(t)
    zero = torch.zeros_like(t["mask"])
    for algo in ("rpg", "rpg_reinforce", "grpo", "cispo"):
        value, grad, _, metrics = grads_by(
            "triton", t["lp"], t["lo"], t["a"], zero, t["lref"], LossConfig.preset(algo)
        )
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
        assert all(float(v) == 0.0 for v in metrics.values())
    with pytest.raises(ValueError, match="algo"):  # gspo's sequence ratio is not a token-level epilogue
        epilogue.kernel_constexprs(LossConfig.preset("gspo"), torch.float32)


@pytest.mark.parametrize("kl", KLS)
def test_underflowing_ratio_matches_float64(kl):
    """w = exp(-150) is 0 in fp32: the sign of A' = A + C/w must still be right (C/w in closed form),
    so both backends in fp32 agree with the fp64 computation, without NaN."""
    lp = torch.tensor([[-0.5, -1.0, -2.0, -0.7]], dtype=torch.float64)
    old = lp + torch.tensor([[150.0, 150.0, 0.1, -0.2]], dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.3]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = LossConfig.preset("rpg_reinforce", kl=kl, beta=0.01)
    expected = grads_by("torch", lp, old, adv, mask, config=cfg)
    args = [t.float().to(DEVICE) for t in (lp, old, adv)]
    for backend in ("torch", "triton"):
        got = grads_by(backend, args[0], args[1], args[2], mask.to(DEVICE), config=cfg)
        assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
        torch.testing.assert_close(got[0].double().cpu(), expected[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[1].double().cpu(), expected[1], rtol=1e-5, atol=1e-7)
        for key in ("clip_frac_low", "clip_frac_high", "clip_frac_dual"):
            assert float(got[3][key]) == float(expected[3][key]), key
