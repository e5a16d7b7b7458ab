"""Triton per-token loss epilogue: L, dL/dl and the clip zone of every token in one elementwise pass.

For the token-level algos (all but ``gspo``, whose sequence ratio couples tokens) the kernel reads
``l, l_old, [l_ref], A, mask, weight`` and writes, per token (docs/MATH.md §2-3, notation of §1):

- ``loss``: ``L`` (0 on masked-out tokens), to be summed as ``sum(L * weight)``;
- ``grad``: ``weight * dL/dl``, the gradient of the aggregated loss w.r.t. ``l``;
- ``zone``: int8 clip-zone code, `ZONE_NONE` / `ZONE_LOW` / `ZONE_HIGH` / `ZONE_DUAL`
  (same definitions as `rpg_kernels.loss.token_losses`);
- ``kl``: the KL term's value without beta (Omega, or the estimator; k3 when none) and ``ratio`` (w).

Masked-out tokens may hold garbage: every input is replaced by 0 there before any exp/log.
Arithmetic runs in ``COMPUTE`` (fp32, or fp64 when an input is fp64), whatever the input dtypes.
The config's scalars come in a small tensor of that dtype, so fp64 runs see exact fp64 constants.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rpg_kernels.config import LossConfig
from rpg_kernels.loss.inputs import LossInputs

ALGO_RPG, ALGO_RPG_REINFORCE, ALGO_PPO, ALGO_CISPO = 0, 1, 2, 3
# grpo, dapo, dr_grpo and reinforce_pp share the PPO-style token loss; they differ in presets only.
ALGO_CODES = {
    "rpg": ALGO_RPG,
    "rpg_reinforce": ALGO_RPG_REINFORCE,
    "grpo": ALGO_PPO,
    "dapo": ALGO_PPO,
    "dr_grpo": ALGO_PPO,
    "reinforce_pp": ALGO_PPO,
    "cispo": ALGO_CISPO,
}
KL_CODES = {"fkl": 0, "rkl": 1, "ufkl": 2, "urkl": 3}
ESTIMATOR_CODES = {None: -1, "k1": 0, "k2": 1, "k3": 2, "k3_is": 3}
CLIP_CODES = {"none": 0, "truncate": 1, "dual": 2}
ZONE_NONE, ZONE_LOW, ZONE_HIGH, ZONE_DUAL = 0, 1, 2, 3
DEFAULT_BLOCK = 1024
NUM_WARPS = 8  # 4 tokens per thread: 16-byte fp32 loads, no register spills for any algo (ptxas)


@triton.jit
def _regulariser(w, log_rho, kappa, KL: tl.constexpr):
    """Omega and dOmega/dl of docs/MATH.md §2 (KL: 0 fkl, 1 rkl, 2 ufkl, 3 urkl)."""
    if KL == 0:
        omega = -kappa * log_rho
        d_omega = -kappa
    elif KL == 1:
        omega = w * log_rho
        d_omega = w * (log_rho + 1.0)
    elif KL == 2:
        omega = w - kappa - kappa * log_rho
        d_omega = w - kappa
    else:
        omega = w * log_rho - w + kappa
        d_omega = w * log_rho
    return omega, d_omega


@triton.jit
def _coefficient_over_ratio(log_rho, KL: tl.constexpr):
    """``-C(w) / (beta w) = dOmega/dl / w`` in closed form (kappa / w = 1 / rho): finite when w underflows."""
    if KL == 0:
        value = -tl.exp(-log_rho)
    elif KL == 1:
        value = log_rho + 1.0
    elif KL == 2:
        value = 1.0 - tl.exp(-log_rho)
    else:
        value = log_rho
    return value


@triton.jit
def _estimator(w, log_rho, KL: tl.constexpr):
    """The baselines' estimators on rho and their d/dl (KL: 0 k1, 1 k2, 2 k3, 3 k3_is)."""
    if KL == 0:
        value = log_rho
        d_value = log_rho * 0.0 + 1.0
    elif KL == 1:
        value = 0.5 * log_rho * log_rho
        d_value = log_rho
    else:
        inv_rho = tl.exp(-log_rho)
        value = inv_rho - 1.0 + log_rho
        d_value = 1.0 - inv_rho
        if KL == 3:
            d_value = w * value + w * d_value
            value = w * value
    return value, d_value


@triton.jit
def _clamp_kl(value, d_value, kl_clamp):
    """Clamp the KL term's value to [-kl_clamp, kl_clamp] (inf: no clamp); the gradient is 0 outside."""
    inside = tl.abs(value) <= kl_clamp
    return tl.minimum(tl.maximum(value, -kl_clamp), kl_clamp), tl.where(inside, d_value, 0.0)


@triton.jit
def _dual_clip(ratio, adv, low_bound, high_bound, clip_c):
    """DC(w, A) of docs/MATH.md §3, its derivative in w, and the zone code."""
    high = (adv > 0) & (ratio > high_bound)
    low = (adv < 0) & (ratio < low_bound)
    dual = (adv < 0) & (ratio > clip_c)
    value = tl.where(
        high, -adv * high_bound, tl.where(low, -adv * low_bound, tl.where(dual, -adv * clip_c, -adv * ratio))
    )
    d_value = tl.where(high | low | dual, 0.0, -adv)
    zone = tl.where(high, 2, tl.where(low, 1, tl.where(dual, 3, 0)))  # ZONE_HIGH, ZONE_LOW, ZONE_DUAL
    return value, d_value, zone


@triton.jit
def token_loss(
    lp,
    old,
    ref,
    adv,
    rollout_weight,
    beta,
    low_bound,
    high_bound,
    clip_c,
    kl_clamp,
    ALGO: tl.constexpr,
    KL: tl.constexpr,
    CLIP_MODE: tl.constexpr,
):
    """The per-token loss of docs/MATH.md §3 and its derivative in ``l``: ``(L, dL/dl, zone, kl, w)``.

    Works on blocks of tokens and on single tokens (the row kernel). ``ref == old`` means no reference
    (``kappa = exp(0) = 1`` exactly). ``rollout_weight`` (docs/MATH.md §9) multiplies the whole loss of the
    RPG algos and the policy term of the baselines. ``low_bound`` is ``1 - eps_low`` (``cispo`` without a
    lower clip: 0); ``KL`` is the divergence for ALGO rpg/rpg_reinforce and the estimator (-1: none) else.
    """
    log_ratio = lp - old
    w = tl.exp(log_ratio)
    log_rho = lp - ref
    kappa = tl.exp(ref - old)
    zone = tl.zeros_like(lp).to(tl.int32)

    if ALGO == 0:  # rpg: DC(w, A) + beta * Omega
        omega, d_omega = _regulariser(w, log_rho, kappa, KL)
        kl, d_kl = _clamp_kl(omega, d_omega, kl_clamp)
        if CLIP_MODE == 0:
            policy = -adv * w
            d_policy = -adv * w
        else:
            policy, d_policy_dw, zone = _dual_clip(w, adv, low_bound, high_bound, clip_c)
            d_policy = d_policy_dw * w
        loss = rollout_weight * (policy + beta * kl)
        grad = rollout_weight * (d_policy + beta * d_kl)
    elif ALGO == 1:  # rpg_reinforce: -SG(w A + C(w)) l, C = -beta dOmega/dl
        if CLIP_MODE == 1:  # truncate: w -> clip(w), log(rho) shifted to match
            zone = tl.where(w < low_bound, 1, tl.where(w > high_bound, 2, 0))
            w_c = tl.minimum(tl.maximum(w, low_bound), high_bound)
            log_rho = log_rho + tl.log(w_c) - log_ratio
        else:
            w_c = w
        omega, d_omega = _regulariser(w_c, log_rho, kappa, KL)
        kl, d_kl = _clamp_kl(omega, d_omega, kl_clamp)
        coef_kl = -beta * d_kl
        coef = w_c * adv + coef_kl
        grad = -coef
        if CLIP_MODE == 2:  # dual: branch on the sign of A' = A + C(w)/w
            d_omega_over_w = _coefficient_over_ratio(log_rho, KL)
            d_omega_over_w = tl.where(tl.abs(omega) <= kl_clamp, d_omega_over_w, 0.0)
            positive = adv - beta * d_omega_over_w >= 0
            high = positive & (w >= high_bound)
            low = (~positive) & (w <= low_bound)
            dual = (~positive) & (w >= clip_c)
            w_star = tl.where(high, high_bound, tl.where(low, low_bound, clip_c))
            flows = ~(high | low | dual)
            coef = tl.where(flows, coef, w_star * adv + coef_kl)
            grad = tl.where(flows, -coef, 0.0)
            zone = tl.where(high, 2, tl.where(low, 1, tl.where(dual, 3, 0)))
        loss = -rollout_weight * coef * lp
        grad = rollout_weight * grad
    else:  # the baselines: PPO-style (or CISPO) policy term + beta * estimator
        if KL >= 0:
            estimate, d_estimate = _estimator(w, log_rho, KL)
            kl, d_kl = _clamp_kl(estimate, d_estimate, kl_clamp)
            kl_loss = beta * kl
            d_kl_loss = beta * d_kl
        else:
            kl, _ = _estimator(w, log_rho, 2)  # monitored only
            kl_loss = 0.0
            d_kl_loss = 0.0
        if ALGO == 3:  # cispo: -SG(clip(w, 1 - eps_low, 1 + eps_high)) A l
            if CLIP_MODE == 2:
                zone = tl.where(w > high_bound, 2, tl.where(w < low_bound, 1, 0))
                w_c = tl.maximum(tl.minimum(w, high_bound), low_bound)
            else:
                w_c = w
            loss = -rollout_weight * w_c * adv * lp + kl_loss
            grad = -rollout_weight * w_c * adv + d_kl_loss
        else:
            if CLIP_MODE == 0:
                policy = -adv * w
                d_policy = -adv * w
            else:
                policy, d_policy_dw, zone = _dual_clip(w, adv, low_bound, high_bound, clip_c)
                d_policy = d_policy_dw * w
            loss = rollout_weight * policy + kl_loss
            grad = rollout_weight * d_policy + d_kl_loss
    return loss, grad, zone, kl, w


@triton.jit
def token_loss_epilogue_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    weight_ptr,
    rollout_weight_ptr,
    params_ptr,
    loss_ptr,
    grad_ptr,
    zone_ptr,
    kl_ptr,
    ratio_ptr,
    n_tokens,
    adv_div,
    ALGO: tl.constexpr,
    KL: tl.constexpr,
    CLIP_MODE: tl.constexpr,
    HAS_ROLLOUT_WEIGHT: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per ``BLOCK`` tokens. ``adv_div``: 1 for per-token advantages, ``T`` for ``[B]`` ones.

    ``params``: ``[beta, 1 - eps_low, 1 + eps_high, clip_c, kl_clamp]`` in ``COMPUTE`` (`kernel_params`).
    ``rollout_weight_ptr``: per-token weights (read when ``HAS_ROLLOUT_WEIGHT``).
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_tokens
    keep = (tl.load(mask_ptr + offs, mask=in_range, other=0) != 0) & in_range
    beta, low_bound, high_bound, clip_c, kl_clamp = load_params(params_ptr)

    # masked-out tokens are not read (other=0), so garbage there never reaches exp/log
    lp = tl.load(logp_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    old = tl.load(old_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    adv = tl.load(adv_ptr + offs // adv_div, mask=keep, other=0.0).to(COMPUTE)
    weight = tl.load(weight_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    # without a reference the wrapper passes ref_ptr = old_ptr: then log_rho == log_ratio and
    # kappa == exp(0) == 1 exactly, at the price of re-reading cached memory
    ref = tl.load(ref_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    if HAS_ROLLOUT_WEIGHT:
        rollout_weight = tl.load(rollout_weight_ptr + offs, mask=keep, other=0.0).to(COMPUTE)
    else:
        rollout_weight = 1.0
    loss, grad, zone, kl, w = token_loss(
        lp, old, ref, adv, rollout_weight, beta, low_bound, high_bound, clip_c, kl_clamp, ALGO, KL, CLIP_MODE
    )
    tl.store(loss_ptr + offs, tl.where(keep, loss, 0.0), mask=in_range)
    tl.store(grad_ptr + offs, tl.where(keep, grad * weight, 0.0), mask=in_range)
    tl.store(zone_ptr + offs, tl.where(keep, zone, 0).to(tl.int8), mask=in_range)
    tl.store(kl_ptr + offs, tl.where(keep, kl, 0.0), mask=in_range)
    tl.store(ratio_ptr + offs, tl.where(keep, w, 0.0), mask=in_range)


@triton.jit
def load_params(params_ptr):
    """``(beta, 1 - eps_low, 1 + eps_high, clip_c, kl_clamp)`` from the `kernel_params` tensor."""
    beta = tl.load(params_ptr + 0)
    low_bound = tl.load(params_ptr + 1)
    high_bound = tl.load(params_ptr + 2)
    clip_c = tl.load(params_ptr + 3)
    kl_clamp = tl.load(params_ptr + 4)
    return beta, low_bound, high_bound, clip_c, kl_clamp


# (algo, overrides, compute dtype, log-prob input type): every ALGO x CLIP_MODE pair, every KL code, both
# compute dtypes and the half-precision inputs appear; `aot_variants(every=True)` compiles them all.
_COVERING_SET = [
    ("rpg", dict(kl="fkl", clip_mode="none"), torch.float32, "bf16"),
    ("rpg", dict(kl="urkl", clip_mode="dual"), torch.float64, "fp64"),
    ("rpg_reinforce", dict(kl="rkl", clip_mode="none"), torch.float32, "fp16"),
    ("rpg_reinforce", dict(kl="ufkl", clip_mode="truncate"), torch.float32, "fp32"),
    ("rpg_reinforce", dict(kl="urkl", clip_mode="dual"), torch.float32, "bf16"),
    ("grpo", dict(kl_estimator="k3", clip_mode="dual"), torch.float32, "fp32"),
    ("grpo", dict(kl_estimator=None, clip_mode="none"), torch.float64, "fp64"),
    ("cispo", dict(kl_estimator="k2", clip_mode="dual"), torch.float32, "fp32"),
    ("cispo", dict(kl_estimator="k1", clip_mode="none"), torch.float32, "fp32"),
    ("grpo", dict(kl_estimator="k3_is", clip_mode="dual"), torch.float32, "fp32"),
]
_DTYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64"}


def _every_combination():
    """Every (ALGO, KL, CLIP_MODE) the package can launch, times both compute dtypes."""
    from rpg_kernels.config import KL_ESTIMATORS, KLS

    cases = [("rpg", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "dual")]
    cases += [("rpg_reinforce", dict(kl=kl, clip_mode=m)) for kl in KLS for m in ("none", "truncate", "dual")]
    for algo in ("grpo", "cispo"):
        cases += [
            (algo, dict(kl_estimator=e, clip_mode=m))
            for e in (None, *KL_ESTIMATORS)
            for m in ("none", "dual")
        ]
    out = {}
    for algo, overrides in cases:
        for dtype in (torch.float32, torch.float64):
            config = LossConfig.preset(algo, **overrides)
            out[tuple(kernel_constexprs(config, dtype).values())] = (
                algo,
                overrides,
                dtype,
                _DTYPE_NAMES[dtype],
            )
    return list(out.values())


def aot_variants(every: bool = False):
    """Yield ``(family, kernel, types, constexprs)``: a covering set of the epilogue's launches, or with
    ``every`` each (ALGO, KL, CLIP_MODE, COMPUTE) combination the package can launch."""
    pointers = ("old_ptr", "ref_ptr", "adv_ptr", "weight_ptr", "rollout_weight_ptr", "loss_ptr", "grad_ptr")
    pointers += ("kl_ptr", "ratio_ptr", "params_ptr")
    for index, (algo, overrides, compute, input_type) in enumerate(
        _every_combination() if every else _COVERING_SET
    ):
        config = LossConfig.preset(algo, **overrides)
        name = _DTYPE_NAMES[compute]
        types = {p: f"*{name}" for p in pointers}
        types.update(logp_ptr=f"*{input_type}", mask_ptr="*i8", zone_ptr="*i8", n_tokens="i64", adv_div="i64")
        constexprs = dict(
            kernel_constexprs(config, compute), HAS_ROLLOUT_WEIGHT=index % 2 == 1, BLOCK=DEFAULT_BLOCK
        )
        yield "token_loss_epilogue", token_loss_epilogue_kernel, types, constexprs


@dataclass
class EpilogueOutputs:
    """Per-token outputs, shaped like the inputs' ``[B, T]``; ``zone`` int8, the rest in the compute dtype."""

    loss: torch.Tensor
    grad: torch.Tensor
    zone: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor


def kernel_constexprs(config: LossConfig, compute_dtype: torch.dtype) -> dict:
    """The kernel's constexpr arguments (except ``BLOCK``) for ``config``."""
    if config.algo not in ALGO_CODES:
        raise ValueError(f"the token loss epilogue does not handle algo={config.algo!r} (sequence-level)")
    kl = KL_CODES[config.kl] if config.is_rpg else ESTIMATOR_CODES[config.kl_estimator]
    compute = tl.float64 if compute_dtype == torch.float64 else tl.float32
    return dict(ALGO=ALGO_CODES[config.algo], KL=kl, CLIP_MODE=CLIP_CODES[config.clip_mode], COMPUTE=compute)


@functools.lru_cache(maxsize=64)
def kernel_params(config: LossConfig, compute_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[beta, 1 - eps_low, 1 + eps_high, clip_c, kl_clamp]`` on ``device`` (cached: no copy per call).

    The bounds are formed in float64 and rounded once, as the PyTorch path does. Read-only.
    """
    kl_clamp = float("inf") if config.kl_clamp is None else config.kl_clamp
    low_bound = 0.0 if config.eps_low is None else 1.0 - config.eps_low  # cispo without a lower clip
    values = [config.beta, low_bound, 1.0 + config.eps_high, config.clip_c, kl_clamp]
    return torch.tensor(values, dtype=torch.float64).to(device=device, dtype=compute_dtype)


def token_loss_epilogue(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    config: LossConfig,
    ref_logprobs: torch.Tensor | None = None,
    rollout_weights: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK,
) -> EpilogueOutputs:
    """Launch the epilogue on ``[B, T]`` inputs (validated by the caller; masked-out entries may be garbage).

    ``advantages`` and ``rollout_weights``: ``[B, 1]`` or ``[B, T]``; ``mask``: bool ``[B, T]``;
    ``weights``: aggregation weights ``[B, T]`` in the compute dtype (fp64 when any input is fp64, else
    fp32), 0 on masked-out tokens.
    """
    batch, length = logprobs.shape
    compute_dtype = weights.dtype
    device = logprobs.device
    per_sequence = advantages.shape[-1] == 1 and length != 1
    params = kernel_params(config, compute_dtype, device)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.contiguous().view(-1)

    n_tokens = batch * length
    outputs = EpilogueOutputs(
        loss=torch.empty(n_tokens, dtype=compute_dtype, device=device),
        grad=torch.empty(n_tokens, dtype=compute_dtype, device=device),
        zone=torch.empty(n_tokens, dtype=torch.int8, device=device),
        kl=torch.empty(n_tokens, dtype=compute_dtype, device=device),
        ratio=torch.empty(n_tokens, dtype=compute_dtype, device=device),
    )
    if n_tokens > 0:
        old = flat(old_logprobs)
        grid = (triton.cdiv(n_tokens, block),)
        token_loss_epilogue_kernel[grid](
            flat(logprobs),
            old,
            old if ref_logprobs is None else flat(ref_logprobs),
            flat(advantages.reshape(batch, -1)),
            flat(mask.to(torch.bool)).view(torch.int8),
            flat(weights),
            flat(rollout_weights.expand(batch, length)) if rollout_weights is not None else old,
            params,
            outputs.loss,
            outputs.grad,
            outputs.zone,
            outputs.kl,
            outputs.ratio,
            n_tokens,
            length if per_sequence else 1,
            **kernel_constexprs(config, compute_dtype),
            HAS_ROLLOUT_WEIGHT=rollout_weights is not None,
            BLOCK=block,
            num_warps=NUM_WARPS,
        )
    return EpilogueOutputs(*(t.view(batch, length) for t in vars(outputs).values()))


def epilogue_loss_and_grads(
    inputs: LossInputs,
    weights: torch.Tensor,
    config: LossConfig,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    entropy_coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """The loss, ``weight * dL/dl``, ``dL/dH`` and the metrics of a token-level algo, by the epilogue.

    ``inputs``: prepared (`rpg_kernels.loss.inputs.prepare_loss_inputs`); ``weights``: their aggregation
    weights ``[B, T]``; ``logprobs``, ``entropy``: ``[B, T]`` from the head. Returns what
    `rpg_kernels.loss.loss_and_logprob_grads` returns, computed by one Triton launch.
    """
    from rpg_kernels.loss import loss_metrics

    dtype = weights.dtype
    logprobs = torch.where(inputs.mask, logprobs.to(dtype), 0.0)
    out = token_loss_epilogue(
        logprobs,
        inputs.old_logprobs,
        inputs.advantages,
        inputs.mask,
        weights,
        config,
        inputs.ref_logprobs,
        inputs.rollout_weights,
    )
    loss = (out.loss * weights).sum()
    grad_entropy = clean_entropy = None
    if entropy is not None:
        clean_entropy = torch.where(inputs.mask, entropy.to(dtype), 0.0)
        if entropy_coef != 0.0:
            loss = loss - entropy_coef * (clean_entropy * weights).sum()
        grad_entropy = -entropy_coef * weights
    zone = out.zone
    metrics = loss_metrics(
        inputs.mask, out.kl, out.ratio, zone == ZONE_LOW, zone == ZONE_HIGH, zone == ZONE_DUAL, clean_entropy
    )
    return loss, out.grad, grad_entropy, metrics
