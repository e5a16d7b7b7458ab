"""verl-signature RPG losses: same per-token losses as rpg_loss, verl's aggregation, verl's registry."""

import importlib.util

import pytest
import torch

from rpg_kernels import LossConfig, rpg_loss
from rpg_kernels.config import KLS
from rpg_kernels.integrations import verl as rk_verl
from rpg_kernels.loss import prepare_loss_inputs, token_losses, validate_loss_inputs

HAS_VERL = importlib.util.find_spec("verl") is not None
LOCAL_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
GLOBAL_INFOS = [
    {},
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": None},
    {"dp_size": 4, "batch_num_tokens": 97, "global_batch_size": 13, "loss_scale_factor": None},
    {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 9, "loss_scale_factor": 16},
    {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "loss_scale_factor": 11},
]


def _inputs(seed, batch=5, length=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=dtype) * 3 - 0.05
    logp = (old + 0.4 * torch.randn(batch, length, generator=gen, dtype=dtype)).clamp(max=-1e-3)
    advantages = torch.randn(batch, generator=gen, dtype=dtype)[:, None].expand(batch, length).contiguous()
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    mask[1] = False  # one fully masked sequence: verl excludes it from the sequence counts
    return old, logp.requires_grad_(True), advantages, mask


def _verl_agg_reference(loss_mat, mask, mode, info):
    """verl's agg_loss semantics, written out (float64)."""
    m = mask.to(loss_mat.dtype)
    dp = info.get("dp_size") or 1
    if mode == "token-sum":
        return (loss_mat * m).sum() * dp
    if mode == "token-mean":
        tokens = info.get("batch_num_tokens") or m.sum()
        return (loss_mat * m).sum() / tokens * dp
    nonempty = (m.sum(-1) > 0).to(loss_mat.dtype)
    seqs = info.get("global_batch_size") or nonempty.sum()
    if mode == "seq-mean-token-mean":
        per_seq = (loss_mat * m).sum(-1) / m.sum(-1).clamp(min=1)
        return (per_seq * nonempty).sum() / seqs * dp
    loss = (loss_mat * m).sum() / seqs * dp
    if mode == "seq-mean-token-sum-norm":
        loss = loss / (info.get("loss_scale_factor") or mask.shape[-1])
    return loss


CASES = [(algo, kl, mode) for algo in ("rpg", "rpg_reinforce") for kl in KLS for mode in ("dual", "none")]
CASES += [("rpg_reinforce", kl, "truncate") for kl in KLS]


@pytest.mark.parametrize("algo, kl, clip_mode", CASES)
def test_matches_rpg_loss_for_every_aggregation(algo, kl, clip_mode):
    fn = rk_verl.POLICY_LOSSES[algo]
    cfg = {
        "clip_ratio": 0.2,
        "clip_ratio_low": 0.15,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "policy_loss": {"loss_mode": algo, "rpg_kl": kl, "rpg_beta": 0.05, "rpg_clip_mode": clip_mode},
    }
    expected_cfg = LossConfig.preset(
        algo, kl=kl, beta=0.05, eps_low=0.15, eps_high=0.28, clip_c=3.0, clip_mode=clip_mode
    )
    for seed, info in enumerate(GLOBAL_INFOS):
        old, logp, advantages, mask = _inputs(seed)
        raw = validate_loss_inputs(logp, old, advantages, mask, config=expected_cfg)
        prepared = prepare_loss_inputs(raw)
        per_token = token_losses(
            prepared.logprobs, prepared.old_logprobs, prepared.advantages, prepared.mask, None, expected_cfg
        ).loss
        for mode in rk_verl.VERL_AGG_MODES:
            loss, metrics = fn(old, logp, advantages, mask, mode, {**cfg, "global_batch_info": info})
            expected = _verl_agg_reference(per_token, mask, mode, info)
            (grad,) = torch.autograd.grad(loss, logp)
            (expected_grad,) = torch.autograd.grad(expected, logp, retain_graph=True)
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
            assert isinstance(metrics["actor/pg_clipfrac"], float) and "actor/rpg_kl" in metrics
        for mode in LOCAL_MODES if not any(info.values()) else []:
            loss, _ = fn(old, logp, advantages, mask, mode, cfg)
            direct, _ = rpg_loss(logp, old, advantages, mask, config=expected_cfg.replace(agg=mode))
            torch.testing.assert_close(loss, direct, rtol=0, atol=0)


def test_options_and_defaults():
    cfg = rk_verl.loss_config_from_verl("rpg", {"clip_ratio": 0.1})
    assert cfg == LossConfig.preset("rpg", kl="urkl", beta=1e-4, eps_low=0.1, eps_high=0.1, clip_c=3.0)
    top_level = rk_verl.loss_config_from_verl("rpg_reinforce", {"rpg_kl": "rkl", "clip_ratio_c": 10.0})
    assert (top_level.kl, top_level.clip_c) == ("rkl", 10.0)
    override = rk_verl.loss_config_from_verl("rpg", {"policy_loss": {"rpg_kl": "rkl"}}, rpg_kl="fkl")
    assert override.kl == "fkl"
    with pytest.raises(ValueError, match="kl"):
        rk_verl.loss_config_from_verl("rpg", {"policy_loss": {"rpg_kl": "nope"}})
    with pytest.raises(ValueError, match="unknown option"):
        rk_verl.loss_config_from_verl("rpg", None, rpg_kll="fkl")


def test_bad_inputs_raise():
    old, logp, advantages, mask = _inputs(0)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        rk_verl.compute_policy_loss_rpg(old, logp, advantages, mask, "token-avg", {})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        rk_verl.compute_policy_loss_rpg(
            old, logp, advantages, mask, "token-mean", {"global_batch_info": {"dp_size": 2}}
        )
    with pytest.raises(ValueError, match="rollout_weights"):  # a wrong-shaped rollout weight is named
        rk_verl.compute_policy_loss_rpg(
            old,
            logp,
            advantages,
            mask,
            "token-mean",
            {},
            rollout_is_weights=torch.ones(3, 2, dtype=old.dtype),
        )
    with pytest.raises(ValueError, match="algo"):
        rk_verl.register_with_verl("x", algo="grpo")


def test_named_variant_fixes_options():
    registered = rk_verl.register_with_verl("rpg_fkl_test", "rpg", rpg_kl="fkl", rpg_beta=0.3)
    assert registered == HAS_VERL
    old, logp, advantages, mask = _inputs(3)
    loss, _ = rk_verl.POLICY_LOSSES["rpg_fkl_test"](
        old, logp, advantages, mask, "token-mean", {"policy_loss": {"rpg_kl": "urkl"}}
    )
    expected_cfg = LossConfig.preset("rpg", kl="fkl", beta=0.3, eps_low=0.2, eps_high=0.2, clip_c=3.0)
    direct, _ = rpg_loss(logp, old, advantages, mask, config=expected_cfg)
    torch.testing.assert_close(loss, direct, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_VERL, reason="verl is not installed")
def test_through_verl_registry_matches_verl_vanilla():
    from verl.trainer.ppo import core_algos

    assert core_algos.get_policy_loss_fn("rpg") is rk_verl.compute_policy_loss_rpg
    assert core_algos.get_policy_loss_fn("rpg_reinforce") is rk_verl.compute_policy_loss_rpg_reinforce
    actor = _verl_actor(
        policy_loss={
            "_target_": "rpg_kernels.integrations.verl.RPGPolicyLossConfig",
            "loss_mode": "rpg",
            "rpg_beta": 0.0,
            "rpg_kl": "fkl",
        }
    )
    assert type(actor.policy_loss).__name__ == "RPGPolicyLossConfig" and actor.policy_loss.rpg_kl == "fkl"
    for seed, info in enumerate(GLOBAL_INFOS):
        actor.global_batch_info.clear()
        actor.global_batch_info.update(info)
        old, logp, advantages, mask = _inputs(seed)
        for mode in rk_verl.VERL_AGG_MODES:
            ours, _ = core_algos.get_policy_loss_fn("rpg")(old, logp, advantages, mask, mode, actor)
            theirs, _ = core_algos.get_policy_loss_fn("vanilla")(old, logp, advantages, mask, mode, actor)
            torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
            (g_ours,) = torch.autograd.grad(ours, logp)
            (g_theirs,) = torch.autograd.grad(theirs, logp)
            torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-10)


@pytest.mark.skipif(not HAS_VERL, reason="verl is not installed")
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_rollout_is_weights_through_verl_registry(level):
    """verl's rollout importance weights (its own rollout_corr_helper, from vLLM-like log-probs) reach our
    losses as ``rollout_is_weights``: with beta = 0 our ``rpg`` equals verl's ``vanilla`` with the same
    weights, and the weights change the loss; with beta > 0 they multiply the whole RPG loss."""
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_weights

    actor = {
        "clip_ratio_low": 0.2,
        "clip_ratio_high": 0.28,
        "clip_ratio_c": 3.0,
        "policy_loss": {"rpg_beta": 0.0},
    }
    for seed in range(3):
        old, logp, advantages, mask = _inputs(seed)
        rollout = old + 0.2 * torch.randn(
            old.shape, generator=torch.Generator().manual_seed(seed), dtype=old.dtype
        )
        weights, _ = compute_rollout_correction_weights(
            old - rollout, mask, rollout_is=level, rollout_is_threshold=1.5
        )
        assert ((weights != 1.0) & (mask != 0)).any()
        kwargs = dict(rollout_is_weights=weights)
        ours, _ = core_algos.get_policy_loss_fn("rpg")(
            old, logp, advantages, mask, "token-mean", actor, **kwargs
        )
        vanilla = core_algos.get_policy_loss_fn("vanilla")
        theirs, _ = vanilla(old, logp, advantages, mask, "token-mean", _verl_actor(), **kwargs)
        unweighted, _ = core_algos.get_policy_loss_fn("rpg")(old, logp, advantages, mask, "token-mean", actor)
        torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-10)
        assert not torch.allclose(ours, unweighted)
        (g_ours,) = torch.autograd.grad(ours, logp)
        (g_theirs,) = torch.autograd.grad(theirs, logp)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-7, atol=1e-10)
        with_kl = {**actor, "policy_loss": {"rpg_beta": 0.1, "rpg_kl": "urkl"}}
        loss, _ = core_algos.get_policy_loss_fn("rpg")(
            old, logp, advantages, mask, "token-mean", with_kl, **kwargs
        )
        cfg = rk_verl.loss_config_from_verl("rpg", with_kl).replace(agg="token-mean")
        expected, _ = rpg_loss(logp, old, advantages, mask, config=cfg, rollout_weights=weights)
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)


def _verl_actor(**fields):
    """verl's ``ActorConfig`` with the clip ratios of these tests (and ``fields``, e.g. ``policy_loss``)."""
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(
        {
            "_target_": "verl.workers.config.ActorConfig",
            "strategy": "fsdp",
            "rollout_n": 4,
            "ppo_micro_batch_size_per_gpu": 2,
            "clip_ratio_low": 0.2,
            "clip_ratio_high": 0.28,
            "clip_ratio_c": 3.0,
            **fields,
        }
    )


def _next_token_reference(model, input_ids, attention_mask, temperature):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    next_ids = torch.roll(input_ids, shifts=-1, dims=-1)
    return logp.gather(-1, next_ids[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def test_fused_forward_matches_model_log_softmax(make_tiny_lm):
    model = make_tiny_lm("qwen2", seed=2)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    with torch.no_grad():
        expected_logp, expected_entropy = _next_token_reference(model, input_ids, attention_mask, 0.8)
        out = rk_verl.fused_causal_lm_forward(
            model, input_ids=input_ids, attention_mask=attention_mask, temperature=0.8, return_dict=True
        )
    torch.testing.assert_close(out.log_probs, expected_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy, expected_entropy, rtol=1e-5, atol=1e-5)
    shifted = torch.roll(input_ids, shifts=-1, dims=-1)
    with torch.no_grad():
        by_shift = rk_verl.fused_causal_lm_forward(
            model, input_ids=input_ids, attention_mask=attention_mask, shift_labels=shifted, temperature=0.8
        )
    torch.testing.assert_close(by_shift.log_probs, out.log_probs, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_VERL, reason="verl is not installed")
def test_fused_forward_replaces_verl_triton_backend(make_tiny_lm):
    from verl.models.transformers import dense_common
    from verl.models.transformers.monkey_patch import patch_forward_with_backends

    model = make_tiny_lm("qwen2", seed=4)
    cls = type(model)
    original = cls.forward
    original_triton = dense_common.forward_with_triton_backend
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=gen)
    try:
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="torch")
        with torch.no_grad():
            verl_out = model(input_ids=input_ids, temperature=0.7, return_dict=True)
        assert rk_verl.use_rpg_fused_forward_in_verl()
        patch_forward_with_backends(model, use_fused_kernels=True, fused_kernels_backend="triton")
        assert cls.forward is rk_verl.fused_causal_lm_forward
        with torch.no_grad():
            ours = model(input_ids=input_ids, temperature=0.7, return_dict=True)
    finally:
        cls.forward = original
        dense_common.forward_with_triton_backend = original_triton
    torch.testing.assert_close(ours.log_probs, verl_out.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, verl_out.entropy, rtol=1e-5, atol=1e-5)
