"""Public API: fused_linear_rpg_loss == rpg_loss(fused_linear_logprobs(...)) in value, metrics and grads,
on every path (torch; Triton single pass and fused kernels) and for every algo; shapes, dtypes,
ignore_index, masked-out garbage, RPGLoss, bad inputs."""

import pytest
import torch

import rpg_kernels as rk
from rpg_kernels.config import ALGOS
from rpg_kernels.ops import chunked
from rpg_kernels.ops.dispatch import resolve_backend, resolve_method, triton_interpreter_enabled
from tests.ops.ops_reference import assert_close, make_problem, reference

HAS_TRITON = torch.cuda.is_available() or triton_interpreter_enabled()
# every way a fused call runs: the chunked PyTorch path; on Triton the single pass and the fused kernels
PATHS = [dict(backend="torch", method="auto")]
PATHS += [dict(backend="triton", method=m) for m in ("single_pass", "fused")] if HAS_TRITON else []
PATH_IDS = [f"{p['backend']}-{p['method']}" for p in PATHS]
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


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_fused_loss_equals_loss_of_fused_logprobs(algo, path):
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
        **path,
    )
    (2.5 * loss1).backward()

    h2, w2, b2 = leaves(batch)
    logprobs, entropy = rk.fused_linear_logprobs(
        h2, w2, batch["targets"], bias=b2, temperature=0.8, return_entropy=True, **path
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
        monkeypatch.setattr(chunked, "single_pass_fits", lambda v, elements, fits=single_pass: fits)
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


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_fused_logprobs_shapes_dtypes_and_reference(path):
    p = make_problem(3, 21, 24, 97, device=DEVICE)
    hidden = p.hidden.reshape(3, 7, 24)
    logprobs, entropy = rk.fused_linear_logprobs(
        hidden,
        p.weight,
        p.targets.reshape(3, 7),
        bias=p.bias,
        temperature=p.temperature,
        return_entropy=True,
        **path,
    )
    assert logprobs.shape == (3, 7) and entropy.shape == (3, 7) and logprobs.dtype == torch.float32
    ref = reference(p)
    assert_close("logprob", logprobs.reshape(-1), ref["logprob"], 1e-5, scale=ref["logit_max"].item())
    assert_close("entropy", entropy.reshape(-1), ref["entropy"], 1e-5)
    only = rk.fused_linear_logprobs(
        hidden, p.weight, p.targets.reshape(3, 7), bias=p.bias, temperature=p.temperature, **path
    )
    torch.testing.assert_close(only, logprobs)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_entropy_only_backward(path):
    """Backward with a grad on the entropy output only (no grad reaches the log-probs)."""
    p = make_problem(4, 30, 16, 77, device=DEVICE)
    p.grad_logprob.zero_()
    h, w, b = (t.clone().requires_grad_() for t in (p.hidden, p.weight, p.bias))
    _, entropy = rk.fused_linear_logprobs(
        h, w, p.targets, bias=b, temperature=p.temperature, return_entropy=True, **path
    )
    (entropy * p.grad_entropy).sum().backward()
    ref = reference(p)
    assert_close("dh", h.grad, ref["dh"], 1e-5)
    assert_close("dw", w.grad, ref["dw"], 1e-5)
    assert_close("db", b.grad, ref["db"], 1e-5)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_all_zero_mask_gives_zero_loss_and_grads(path):
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
        **path,
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
    assert resolve_backend("auto", torch.device("cpu")) == "torch"  # the interpreter only when asked for
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    if triton_interpreter_enabled():
        assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_method("auto", "triton") == "single_pass" and resolve_method("fused", "triton") == "fused"
    assert resolve_method("auto", "torch") == "single_pass"
    with pytest.raises(ValueError, match="method"):
        resolve_method("fused", "torch")
    with pytest.raises(ValueError, match="method"):
        resolve_method("fast", "triton")


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


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or the Triton interpreter")
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
            method="fused",
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


def loss_call(batch, path, **changes):
    """The fused loss of ``batch`` on ``path`` with differentiable leaves; returns (loss, metrics, leaves)."""
    h, w, b = leaves(batch)
    args = dict(
        hidden=h,
        weight=w,
        targets=batch["targets"],
        old_logprobs=batch["old"],
        advantages=batch["adv"],
        mask=batch["mask"],
        ref_logprobs=batch["ref"],
        bias=b,
    )
    args.update(changes)
    loss, metrics = rk.fused_linear_rpg_loss(**{**path, **args})
    return loss, metrics, (h, w, b)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize(
    "num_items,error",
    [
        (-1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (True, TypeError),
        (torch.tensor(-2.0), ValueError),
        (torch.tensor(float("nan")), ValueError),
        (torch.ones(2), ValueError),
    ],
)
def test_num_items_is_checked_on_every_path(path, num_items, error):
    """Issue 16.2: the single-pass CPU path used to return loss 0 and zero grads for num_items=-1."""
    with pytest.raises(error, match="num_items"):
        loss_call(make_batch(21), path, num_items=num_items)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("algo", ["rpg_reinforce", "grpo", "gspo"])
def test_masked_out_garbage_never_reaches_a_gradient(path, algo):
    """Issue 16.3: NaN / inf in masked-out hidden rows (and ignored targets) made every dW NaN."""
    batch = make_batch(22, with_ref=True)
    cfg = rk.LossConfig.preset(algo)
    clean_loss, clean_metrics, clean = loss_call(batch, path, config=cfg, entropy_coef=0.01)
    clean_loss.backward()
    dirty = dict(batch, hidden=batch["hidden"].clone())
    out = ~batch["mask"]
    dirty["hidden"][out] = float("nan")
    dirty["hidden"][tuple(out.nonzero()[0])] = float("inf")
    loss, metrics, grads = loss_call(dirty, path, config=cfg, entropy_coef=0.01)
    loss.backward()
    torch.testing.assert_close(loss, clean_loss)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, clean):
        assert torch.isfinite(a.grad).all(), name
        assert_close(f"grad {name}", a.grad, b.grad, 1e-6, scale=1e-6)
    assert (grads[0].grad[out] == 0).all()
    for key in clean_metrics:
        torch.testing.assert_close(metrics[key], clean_metrics[key], msg=key)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_ignore_index_targets_count_as_masked_out(path):
    """Issue 16.4: an ignore_index target on a masked-in token was log-prob 0 (probability 1), so the
    KL read ~158 on a small batch. It now counts as masked out, as in HF and Liger."""
    batch = make_batch(23)
    mask = torch.ones_like(batch["mask"])  # masked in everywhere, ignore_index targets included
    ignored = batch["targets"] == -100
    assert ignored.any()
    loss, metrics, grads = loss_call(batch, path, mask=mask, entropy_coef=0.01)
    expected, expected_metrics, expected_grads = loss_call(
        batch, path, mask=mask & ~ignored, entropy_coef=0.01
    )
    torch.testing.assert_close(loss, expected)
    assert float(metrics["num_tokens"]) == float((~ignored).sum())
    assert float(metrics["kl"]) < 1.0
    loss.backward()
    expected.backward()
    for a, b in zip(grads, expected_grads):
        assert_close("grad", a.grad, b.grad, 1e-6, scale=1e-6)


@pytest.mark.parametrize(
    "changes,error,name",
    [
        (dict(entropy_coef=float("nan")), ValueError, "entropy_coef"),
        (dict(entropy_coef=float("inf")), ValueError, "entropy_coef"),
        (dict(entropy_coef="0.1"), TypeError, "entropy_coef"),
        (dict(old_logprobs=torch.ones(3)), ValueError, "old_logprobs"),
        (dict(hidden=torch.empty(3, 7, 24, device="meta")), ValueError, "meta"),
        (dict(workspace_bytes=0), ValueError, "workspace_bytes"),
        (dict(method="fast"), ValueError, "method"),
        (dict(deterministic=1), TypeError, "deterministic"),
    ],
)
def test_more_bad_values_raise_naming_the_argument(changes, error, name):
    """Issue 16.8: errors named `logprobs` for `old_logprobs`; meta tensors failed inside torch; NaN/inf
    entropy_coef was accepted."""
    with pytest.raises(error, match=name):
        loss_call(make_batch(24), PATHS[0], **changes)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_non_finite_head_on_masked_in_tokens_raises(path):
    """Issue 16.8: non-finite hidden (masked in) or weight gave a NaN loss without an error."""
    batch = make_batch(25)
    hidden = batch["hidden"].clone()
    hidden[tuple(batch["mask"].nonzero()[0])] = float("nan")
    with pytest.raises(ValueError, match="hidden has non-finite"):
        loss_call(dict(batch, hidden=hidden), path)
    weight = batch["weight"].clone()
    weight[3, 2] = float("inf")
    with pytest.raises(ValueError, match="weight has non-finite"):
        loss_call(dict(batch, weight=weight), path)


@pytest.mark.skipif(not HAS_TRITON, reason="needs CUDA or the Triton interpreter")
def test_mixed_dtypes_compute_in_the_activation_dtype(monkeypatch):
    """Issue 12.4: bf16 activations with an fp32 LM head ran in fp32 (no tensor cores). The head now runs
    in bf16 and dW comes back in fp32 from an fp32 accumulator."""
    from rpg_kernels import fused

    seen = []
    real = fused.head_loss
    monkeypatch.setattr(fused, "head_loss", lambda head, *a: seen.append(head.weight.dtype) or real(head, *a))
    batch = make_batch(26)
    h = batch["hidden"].to(torch.bfloat16).requires_grad_()
    w = batch["weight"].clone().requires_grad_()
    loss, _ = rk.fused_linear_rpg_loss(
        h,
        w,
        batch["targets"],
        batch["old"],
        batch["adv"],
        batch["mask"],
        backend="triton",
        method="single_pass",
    )
    loss.backward()
    assert seen == [torch.bfloat16]
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    # the fp32 accumulation: equal to the same computation with a bf16 copy of the weight, done in float64
    w16 = w.detach().to(torch.bfloat16).double().requires_grad_()
    keep = batch["mask"] & (batch["targets"] != -100)
    lp = torch.log_softmax(h.detach().double() @ w16.T, -1).gather(
        -1, batch["targets"].clamp(min=0)[..., None]
    )[..., 0]
    ref, _ = rk.rpg_loss(lp, batch["old"].double(), batch["adv"].double(), keep)
    ref.backward()
    assert_close("dW", w.grad, w16.grad, 1e-2, scale=1e-6)


@pytest.mark.parametrize("path", [p for p in PATHS if p["backend"] == "triton"], ids=PATH_IDS[1:])
def test_fp16_gradients_survive_and_follow_grad_scaler(path, monkeypatch):
    """Issue 12.3: with token-mean weights ~1/N and p ~ 1/V, fp16 dz underflowed and GradScaler could not
    help (the grads are computed in the forward). Scaled per chunk and kept in fp32 until backward, the
    grads of (S * loss) are S times the float64 ones, within fp16 rounding."""
    from rpg_kernels.ops import logit_rows

    monkeypatch.setattr(logit_rows, "INTERPRETER_BLOCK_V", 1024)  # larger blocks: the interpreter is slow
    n, v, h = 384, 2048, 16
    gen = torch.Generator().manual_seed(27)
    hidden = torch.randn(n, h, generator=gen).half()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).half()
    targets = torch.randint(0, v, (n,), generator=gen)
    old = -torch.rand(n, generator=gen) * 3 - 5
    adv = torch.randn(n, generator=gen) * 1e-2  # small advantages: dz ~ 1e-2 / N / V
    mask = torch.ones(n, dtype=torch.bool)
    scale = 2.0**16
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = torch.log_softmax(hd @ wd.T, -1).gather(-1, targets[:, None])[:, 0]
    ref, _ = rk.rpg_loss(lp, old.double(), adv.double(), mask, config=rk.LossConfig.preset("dapo"))
    (scale * ref).backward()
    hh, ww = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = rk.fused_linear_rpg_loss(
        hh, ww, targets, old, adv, mask, config=rk.LossConfig.preset("dapo"), **path
    )
    (scale * loss).backward()
    assert hh.grad.dtype == torch.float16 and ww.grad.dtype == torch.float16
    never = torch.ones(v, dtype=torch.bool)
    never[targets] = False  # rows of dW made of the underflow-prone -g_l * p terms only
    assert_close("dW", ww.grad, wd.grad, 2e-2)
    assert_close("dW rows without a target", ww.grad[never], wd.grad[never], 5e-2)
    assert_close("dh", hh.grad, hd.grad, 2e-2)
