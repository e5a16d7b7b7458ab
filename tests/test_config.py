"""LossConfig: presets (docs/MATH.md §3), overrides and validation."""

import dataclasses
import math

import pytest

from rpg_kernels import LossConfig
from rpg_kernels.config import AGGS, ALGOS, PRESETS


def test_rpg_presets_are_the_paper_defaults():
    for name in ("rpg", "rpg_reinforce"):
        cfg = LossConfig.preset(name)
        assert (cfg.algo, cfg.kl, cfg.kl_estimator, cfg.beta) == (name, "urkl", None, 1e-4)
        assert (cfg.eps_low, cfg.eps_high, cfg.clip_c, cfg.clip_mode) == (0.2, 0.28, 10.0, "dual")
        assert (cfg.agg, cfg.kl_clamp) == ("token-mean", None)


@pytest.mark.parametrize(
    "name, estimator, beta, eps_low, eps_high, agg",
    [
        ("grpo", "k3", 0.04, 0.2, 0.2, "seq-mean-token-mean"),
        ("dapo", None, 0.0, 0.2, 0.28, "token-mean"),
        ("dr_grpo", None, 0.0, 0.2, 0.2, "seq-mean-token-sum-norm"),
        ("reinforce_pp", None, 0.0, 0.2, 0.2, "token-mean"),
        ("gspo", None, 0.0, 3e-4, 4e-4, "seq-mean-token-mean"),
        ("cispo", None, 0.0, None, 0.28, "token-mean"),
    ],
)
def test_baseline_presets(name, estimator, beta, eps_low, eps_high, agg):
    cfg = LossConfig.preset(name)
    assert (cfg.algo, cfg.kl, cfg.kl_estimator, cfg.beta) == (name, None, estimator, beta)
    assert (cfg.eps_low, cfg.eps_high, cfg.agg, cfg.clip_mode) == (eps_low, eps_high, agg, "dual")
    assert math.isinf(cfg.clip_c)


def test_every_algo_has_a_preset_and_every_knob_is_overridable():
    assert set(PRESETS) == set(ALGOS)
    cfg = LossConfig.preset(
        "grpo",
        kl_estimator="k3_is",
        beta=0.01,
        eps_low=0.1,
        eps_high=0.3,
        clip_c=3.0,
        clip_mode="none",
        agg="token-mean",
        kl_clamp=10.0,
    )
    assert (cfg.kl_estimator, cfg.beta, cfg.eps_low, cfg.eps_high, cfg.clip_c) == (
        "k3_is",
        0.01,
        0.1,
        0.3,
        3.0,
    )
    assert (cfg.clip_mode, cfg.agg, cfg.kl_clamp) == ("none", "token-mean", 10.0)
    cfg = LossConfig.preset("rpg_reinforce", kl="fkl", clip_mode="truncate", agg=AGGS[-1])
    assert (cfg.kl, cfg.clip_mode, cfg.agg) == ("fkl", "truncate", AGGS[-1])
    assert cfg.replace(beta=0.5).beta == 0.5 and cfg.beta == 1e-4


def test_defaults_and_frozen():
    cfg = LossConfig()
    assert cfg == LossConfig.preset("rpg")
    assert LossConfig(algo="rpg_reinforce", kl=None).kl == "urkl"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.beta = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(algo="ppo"), "algo"),
        (dict(kl="js"), "kl"),
        (dict(algo="grpo", kl=None, kl_estimator="k4"), "kl_estimator"),
        (dict(agg="mean"), "agg"),
        (dict(clip_mode="soft"), "clip_mode"),
        (dict(clip_c=1.0), "clip_c"),
        (dict(clip_c=0.5), "clip_c"),
        (dict(beta=-1e-3), "beta"),
        (dict(beta=math.nan), "beta"),
        (dict(eps_low=0.0), "eps_low"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(eps_low=-0.1), "eps_low"),
        (dict(eps_high=0.0), "eps_high"),
        (dict(kl_clamp=0.0), "kl_clamp"),
        (dict(kl_estimator="k3"), "kl_estimator"),  # rpg algos take kl, not kl_estimator
        (dict(algo="grpo"), "kl"),  # baselines take kl_estimator, not kl
        (dict(algo="grpo", kl=None, clip_mode="truncate"), "clip_mode"),
    ],
)
def test_invalid_fields_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LossConfig(**kwargs)


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="fkl, rkl, ufkl, urkl"):
        LossConfig(kl="kl")
    with pytest.raises(ValueError, match="rpg_reinforce"):
        LossConfig.preset("ppo")
    with pytest.raises(ValueError, match="betaa"):
        LossConfig.preset("rpg", betaa=0.1)
    with pytest.raises(TypeError, match="beta"):
        LossConfig(beta="0.1")  # type: ignore[arg-type]
