"""Public API: fused_linear_rpg_loss == rpg_loss(fused_linear_logprobs(...)) in value, metrics and grads,
on both backends and for every algo; shapes, dtypes, ignore_index, RPGLoss, bad inputs."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels import fused
from rpg_kernels.config import ALGOS
from rpg_kernels.ops.dispatch import resolve_backend, triton_interpreter_enabled
from tests.ops.ops_reference import assert_close, make_problem, reference

BACKENDS = ["torch"] + (["triton"] if torch.cuda.is_available() or triton_interpreter_enabled() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(seed, b=3, t=7, h=24, v=97, bias=True, with_ref=False, flat=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.3
    bias_t = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[0, :2] = -100
    mask = (targets != -100) & (torch.rand(b, t, generator=gen) > 0.2)
    old = -torch.rand(b, t, generator=gen) * 4 - 1
    ref = old + 0.1 * torch.randn(b, t, generator=gen) if with_ref else None
    adv = torch.randn(b, generator=gen)
    batch = dict(
        hidden=hidden, weight=weight, bias=bias_t, targets=targets, old=old, adv=adv, mask=mask, ref=ref
    )
    if flat:
        for key in ("hidden", "targets", "old", "mask", "ref"):
            if batch[key] is not None:
                batch[key] = batch[key].reshape(b * t, *batch[key].shape[2:])
        batch["adv"] = adv.repeat_interleave(t)
    return {k: (x.to(DEVICE) if x is not None else None) for k, x in batch.items()}


def leaves(batch):
    out = [batch["hidden"].clone().requires_grad_(), batch["weight"].clone().requires_grad_()]
    out.append(batch["bias"].clone().requires_grad_() if batch["bias"] is not None else None)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_fused_loss_equals_loss_of_fused_logprobs(algo, backend):
    seed = ALGOS.index(algo)
    batch = make_batch(seed, with_ref=seed % 2 == 0, flat=seed % 3 == 0)
    cfg = rk.LossConfig.preset(algo)
    entropy_coef = 0.01 if seed % 2 else 0.0
    kwargs = dict(config=cfg, temperature=0.8, bias=None, entropy_coef=entropy_coef)

    h1, w1, b1 = leaves(batch)
    loss1, metrics1 = rk.fused_linear_rpg_loss(
        h1,
        w1,
        batch["targets"],
        batch["old"],
        batch["adv"],
        batch["mask"],
        batch["ref"],
        **{**kwargs, "bias": b1},
        backend=backend,
    )
    (2.5 * loss1).backward()

    h2, w2, b2 = leaves(batch)
    logprobs, entropy = rk.fused_linear_logprobs(
        h2, w2, batch["targets"], bias=b2, temperature=0.8, return_entropy=True, backend=backend
    )
    loss2, metrics2 = rk.rpg_loss(
        logprobs,
        batch["old"],
        batch["adv"],
        batch["mask"],
        batch["ref"],
        cfg,
        entropy=entropy,
        entropy_coef=entropy_coef,
    )
    (2.5 * loss2).backward()

    assert torch.isfinite(loss1) and loss1.dim() == 0
    torch.testing.assert_close(loss1, loss2.to(loss1.dtype), rtol=1e-5, atol=1e-6)
    for name in (
        "kl",
        "clip_frac",
        "clip_frac_low",
        "clip_frac_high",
        "clip_frac_dual",
        "ratio_mean",
        "ratio_max",
        "entropy",
    ):
        torch.testing.assert_close(
            torch.as_tensor(metrics1[name]).float(),
            torch.as_tensor(metrics2[name]).float(),
            rtol=1e-4,
            atol=1e-5,
        )
    for name, a, b in (("hidden", h1, h2), ("weight", w1, w2), ("bias", b1, b2)):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        assert_close(f"grad {name}", a.grad, b.grad, 1e-4, scale=1e-6)


@pytest.mark.parametrize("algo", [a for a in ALGOS if a != "gspo"])
def test_torch_single_pass_equals_two_passes(algo, monkeypatch):
    """The torch backend's one-pass loss (token-level algos) equals its two-pass path."""
    seed = 40 + ALGOS.index(algo)
    batch = make_batch(seed, b=5, t=31, with_ref=seed % 2 == 0, flat=seed % 3 == 0)
    cfg = rk.LossConfig.preset(algo, agg="seq-mean-token-mean")
    results = []
    for single_pass in (True, False):
        monkeypatch.setattr(fused, "single_pass_fits", lambda v, fits=single_pass: fits)
        h, w, b = leaves(batch)
        loss, metrics = rk.fused_linear_rpg_loss(
            h,
            w,
            batch["targets"],
            batch["old"],
            batch["adv"],
            batch["mask"],
            batch["ref"],
            cfg,
            temperature=1.3,
            bias=b,
            entropy_coef=0.02,
            num_items=4,
            backend="torch",
        )
        loss.backward()
        results.append((loss, metrics, h.grad, w.grad, b.grad))
    (loss1, metrics1, *grads1), (loss2, metrics2, *grads2) = results
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-7)
    assert metrics1.keys() == metrics2.keys()
    for name in metrics1:
        torch.testing.assert_close(metrics1[name], metrics2[name], rtol=1e-5, atol=1e-6, msg=name)
    for name, g1, g2 in zip(("hidden", "weight", "bias"), grads1, grads2):
        assert g1.abs().sum() > 0, name
        assert_close(f"grad {name}", g1, g2, 1e-5, scale=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_logprobs_shapes_dtypes_and_reference(backend):
    p = make_problem(3, 21, 24, 97, device=DEVICE)
    hidden = p.hidden.reshape(3, 7, 24)
    logprobs, entropy = rk.fused_linear_logprobs(
        hidden,
        p.weight,
        p.targets.reshape(3, 7),
        bias=p.bias,
        temperature=p.temperature,
        return_entropy=True,
        backend=backend,
    )
    assert logprobs.shape == (3, 7) and entropy.shape == (3, 7) and logprobs.dtype == torch.float32
    ref = reference(p)
    assert_close("logprob", logprobs.reshape(-1), ref["logprob"], 1e-5, scale=ref["logit_max"].item())
    assert_close("entropy", entropy.reshape(-1), ref["entropy"], 1e-5)
    only = rk.fused_linear_logprobs(
        hidden, p.weight, p.targets.reshape(3, 7), bias=p.bias, temperature=p.temperature, backend=backend
    )
    torch.testing.assert_close(only, logprobs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_backward(backend):
    """Backward with a grad on the entropy output only (no grad reaches the log-probs)."""
    p = make_problem(4, 30, 16, 77, device=DEVICE)
    p.grad_logprob.zero_()
    h, w, b = (t.clone().requires_grad_() for t in (p.hidden, p.weight, p.bias))
    _, entropy = rk.fused_linear_logprobs(
        h, w, p.targets, bias=b, temperature=p.temperature, return_entropy=True, backend=backend
    )
    (entropy * p.grad_entropy).sum().backward()
    ref = reference(p)
    assert_close("dh", h.grad, ref["dh"], 1e-5)
    assert_close("dw", w.grad, ref["dw"], 1e-5)
    assert_close("db", b.grad, ref["db"], 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_mask_gives_zero_loss_and_grads(backend):
    batch = make_batch(11)
    h, w, b = leaves(batch)
    loss, _ = rk.fused_linear_rpg_loss(
        h,
        w,
        batch["targets"],
        batch["old"],
        batch["adv"],
        torch.zeros_like(batch["mask"]),
        bias=b,
        backend=backend,
    )
    loss.backward()
    assert loss.item() == 0.0
    for t in (h, w, b):
        assert torch.isfinite(t.grad).all() and (t.grad == 0).all()


def test_no_grad_and_frozen_inputs():
    batch = make_batch(12)
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["old"], batch["adv"], batch["mask"])
    loss, metrics = rk.fused_linear_rpg_loss(*args)
    assert not loss.requires_grad and "entropy" in metrics
    h = batch["hidden"].clone().requires_grad_()
    with torch.no_grad():
        loss_ng, _ = rk.fused_linear_rpg_loss(h, *args[1:])
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss, loss_ng)
    loss_h, _ = rk.fused_linear_rpg_loss(h, *args[1:])  # only hidden needs a grad: weight frozen
    loss_h.backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_mixed_dtypes_promote_and_grads_keep_input_dtypes():
    batch = make_batch(13)
    h = batch["hidden"].to(torch.bfloat16).requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    loss, _ = rk.fused_linear_rpg_loss(
        h, w, batch["targets"], batch["old"], batch["adv"], batch["mask"], backend="torch"
    )
    loss.backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32


def test_rpg_loss_module_matches_function():
    batch = make_batch(14)
    cfg = rk.LossConfig.preset("rpg_reinforce")
    module = rk.RPGLoss(cfg, temperature=0.9, entropy_coef=0.02, backend="torch")
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["old"], batch["adv"], batch["mask"])
    loss_m, _ = module(*args, bias=batch["bias"])
    loss_f, _ = rk.fused_linear_rpg_loss(
        *args, config=cfg, temperature=0.9, bias=batch["bias"], entropy_coef=0.02, backend="torch"
    )
    torch.testing.assert_close(loss_m, loss_f)
    assert "rpg_reinforce" in repr(module)
    with pytest.raises(TypeError, match="config"):
        rk.RPGLoss("rpg")


def test_backend_resolution():
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    expected = "triton" if triton_interpreter_enabled() else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))


def _bad_cases(batch):
    v, h = batch["weight"].shape
    bad_targets = batch["targets"].clone()
    bad_targets[1, 1] = v
    return [
        (dict(hidden=batch["hidden"][0, 0]), ValueError, "hidden"),
        (dict(weight=batch["weight"][:, :-1]), ValueError, "weight"),
        (dict(bias=torch.zeros(v + 1)), ValueError, "bias"),
        (dict(targets=bad_targets), ValueError, "targets"),
        (dict(targets=batch["targets"].float()), TypeError, "targets"),
        (dict(targets=batch["targets"][:, :-1]), ValueError, "targets"),
        (dict(hidden=batch["hidden"].long()), TypeError, "hidden"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(old=batch["old"][:, :-1]), ValueError, "old_logprobs"),
        (dict(adv=torch.randn(5)), ValueError, "advantages"),
        (dict(old=torch.where(batch["mask"], float("nan"), batch["old"])), ValueError, "old_logprobs"),
        (dict(mask=batch["mask"][:1]), ValueError, "mask"),
        (dict(config="rpg"), TypeError, "config"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_inputs_raise_naming_the_argument(case):
    batch = make_batch(15)
    changes, error, name = _bad_cases(batch)[case]
    args = {**batch, "config": None, "temperature": 1.0, "backend": "torch", "ignore_index": -100, **changes}
    with pytest.raises(error, match=name):
        rk.fused_linear_rpg_loss(
            args["hidden"],
            args["weight"],
            args["targets"],
            args["old"],
            args["adv"],
            args["mask"],
            config=args["config"],
            temperature=args["temperature"],
            bias=args["bias"],
            backend=args["backend"],
            ignore_index=args["ignore_index"],
        )
    if "old" not in changes and "adv" not in changes and "mask" not in changes and "config" not in changes:
        with pytest.raises(error, match=name):
            rk.fused_linear_logprobs(
                args["hidden"],
                args["weight"],
                args["targets"],
                bias=args["bias"],
                temperature=args["temperature"],
                backend=args["backend"],
                ignore_index=args["ignore_index"],
            )


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs CUDA or the Triton interpreter")
def test_atomic_backward_through_the_public_api():
    batch = make_batch(16)
    results = []
    for deterministic in (True, False):
        h, w, b = leaves(batch)
        loss, _ = rk.fused_linear_rpg_loss(
            h,
            w,
            batch["targets"],
            batch["old"],
            batch["adv"],
            batch["mask"],
            bias=b,
            entropy_coef=0.05,
            backend="triton",
            deterministic=deterministic,
        )
        loss.backward()
        results.append((loss, h.grad, w.grad, b.grad))
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), *results):
        assert_close(name, a, b, 1e-5, scale=1e-6)


def test_tensors_on_different_devices_raise():
    batch = make_batch(17)
    with pytest.raises(ValueError, match="targets"):
        rk.fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"].to("meta"))
    with pytest.raises(ValueError, match="old_logprobs|advantages|mask"):
        rk.fused_linear_rpg_loss(
            batch["hidden"],
            batch["weight"],
            batch["targets"],
            batch["old"].to("meta"),
            batch["adv"],
            batch["mask"],
        )
