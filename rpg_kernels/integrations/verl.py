"""RPG policy losses with verl's policy-loss signature; registered in verl's registry when verl is importable.

verl calls a policy loss as ``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (pg_loss, metrics)``. This module provides ``rpg`` and ``rpg_reinforce`` with that
signature, computed by `rpg_kernels.rpg_loss`, and usable without verl (``POLICY_LOSSES``). Importing it with
verl installed registers both names, so in a verl run::

    actor_rollout_ref.model.external_lib=rpg_kernels.integrations.verl   # imports this module in the workers
    actor_rollout_ref.actor.policy_loss.loss_mode=rpg_reinforce          # or rpg
    actor_rollout_ref.actor.clip_ratio_low=0.2 actor_rollout_ref.actor.clip_ratio_high=0.28
    actor_rollout_ref.actor.clip_ratio_c=10.0
    actor_rollout_ref.actor.policy_loss._target_=rpg_kernels.integrations.verl.RPGPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.rpg_kl=urkl +actor_rollout_ref.actor.policy_loss.rpg_beta=1e-4

Options read from ``config`` (verl's ``ActorConfig``, a ``DictConfig`` or a plain dict):

* ``clip_ratio`` / ``clip_ratio_low`` / ``clip_ratio_high`` → ``eps_low`` / ``eps_high``;
  ``clip_ratio_c`` → ``clip_c`` (verl's dual-clip bound, the same ``c``).
* ``rpg_kl`` (``fkl``, ``rkl``, ``ufkl``, ``urkl``; default ``urkl``), ``rpg_beta`` (default 1e-4),
  ``rpg_clip_mode`` (default ``dual``), ``rpg_kl_clamp`` (default None): looked up in ``config.policy_loss``
  first, then in ``config``. Options passed to `register_with_verl` win over both.
* ``loss_agg_mode`` and ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``) → our ``agg`` and ``num_items``, giving the same
  normalisation as verl's ``agg_loss`` (``token-sum`` included).

The KL reference is RPG's iterative one: the old (sampling) policy, so no reference model is needed.

Rollout importance sampling: when verl's ``algorithm.rollout_correction`` computes ``rollout_is_weights``
(verl hands them to every registered policy loss as a keyword, ``None`` when off), they are the
``rollout_weights`` of docs/MATH.md §9: for these RPG losses they multiply the whole per-token loss (its KL
term is an expectation under the sampler too); verl's own losses weight their policy term.

Fused log-probs: with ``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=triton`` verl replaces the model's forward by
one that returns ``log_probs`` and ``entropy`` from the hidden states. `use_rpg_fused_forward_in_verl` (or the
environment variable ``RPG_KERNELS_VERL_FUSED=1`` in the workers) makes that forward
`fused_causal_lm_forward`, i.e. ``rpg_kernels.fused_linear_logprobs``, for verl's dense text models.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from rpg_kernels.config import LossConfig
from rpg_kernels.integrations.hf import lm_head_params
from rpg_kernels.loss import rpg_loss

__all__ = [  # noqa: F822 (RPGPolicyLossConfig comes from the module __getattr__: it needs verl)
    "POLICY_LOSSES",
    "RPGPolicyLossConfig",
    "VERL_AGG_MODES",
    "compute_policy_loss_rpg",
    "compute_policy_loss_rpg_reinforce",
    "fused_causal_lm_forward",
    "loss_config_from_verl",
    "register_with_verl",
    "use_rpg_fused_forward_in_verl",
    "verl_aggregation",
]

VERL_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
_RPG_OPTIONS = {"rpg_kl": "urkl", "rpg_beta": 1e-4, "rpg_clip_mode": "dual", "rpg_kl_clamp": None}

PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Any]]]


def _lookup(config: Any, key: str) -> Any:
    """``config[key]`` for dicts, ``DictConfig`` and verl's ``BaseConfig``; ``None`` when absent."""
    if config is None:
        return None
    if isinstance(config, Mapping) or hasattr(config, "get"):
        try:
            return config.get(key, None)
        except (AttributeError, KeyError, TypeError):
            pass
    return getattr(config, key, None)


def _option(config: Any, key: str, overrides: Mapping[str, Any]) -> Any:
    if key in overrides:
        return overrides[key]
    for scope in (_lookup(config, "policy_loss"), config):
        value = _lookup(scope, key)
        if value is not None:
            return value
    return _RPG_OPTIONS[key]


def loss_config_from_verl(algo: str, config: Any, **overrides: Any) -> LossConfig:
    """The `LossConfig` of ``algo`` (``rpg`` or ``rpg_reinforce``) for a verl actor ``config``.

    ``overrides``: ``rpg_kl``, ``rpg_beta``, ``rpg_clip_mode``, ``rpg_kl_clamp`` or ``clip_ratio_c``,
    taking precedence over ``config``. The returned ``agg`` is a placeholder: see `verl_aggregation`.
    """
    unknown = set(overrides) - set(_RPG_OPTIONS) - {"clip_ratio_c"}
    if unknown:
        valid = sorted(_RPG_OPTIONS) + ["clip_ratio_c"]
        raise ValueError(f"unknown option(s) {sorted(unknown)}; valid: {valid}")
    clip_ratio = _lookup(config, "clip_ratio")
    clip_ratio = 0.2 if clip_ratio is None else clip_ratio
    eps_low = _lookup(config, "clip_ratio_low")
    eps_high = _lookup(config, "clip_ratio_high")
    clip_c = overrides.get("clip_ratio_c", _lookup(config, "clip_ratio_c"))
    return LossConfig.preset(
        algo,
        kl=_option(config, "rpg_kl", overrides),
        beta=_option(config, "rpg_beta", overrides),
        clip_mode=_option(config, "rpg_clip_mode", overrides),
        kl_clamp=_option(config, "rpg_kl_clamp", overrides),
        eps_low=clip_ratio if eps_low is None else eps_low,
        eps_high=clip_ratio if eps_high is None else eps_high,
        clip_c=3.0 if clip_c is None else clip_c,  # verl's default clip_ratio_c
    )


def verl_aggregation(
    loss_agg_mode: str, mask: Tensor, global_batch_info: Mapping[str, Any] | None
) -> tuple[str, float | Tensor | None]:
    """``(agg, num_items)`` that reproduce verl's ``agg_loss(..., loss_agg_mode, **global_batch_info)``.

    verl multiplies by ``dp_size`` (the data-parallel gradient average divides it back out); we divide the
    global count by it, which is the same. ``token-sum`` is ``token-mean`` with ``num_items = 1 / dp_size``.
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode: expected one of {VERL_AGG_MODES}, got {loss_agg_mode!r}")
    info = dict(global_batch_info or {})
    dp_size = info.get("dp_size") or 1
    if loss_agg_mode == "token-sum":
        return "token-mean", 1.0 / dp_size
    if loss_agg_mode == "token-mean":
        global_count, name = info.get("batch_num_tokens"), "batch_num_tokens"
    else:
        global_count, name = info.get("global_batch_size"), "global_batch_size"
    if global_count is None and dp_size > 1:
        raise ValueError(f"global_batch_info: {name} is required when dp_size > 1 (as in verl's agg_loss)")
    num_items = None if global_count is None else global_count / dp_size
    scale_factor = info.get("loss_scale_factor")
    if loss_agg_mode == "seq-mean-token-sum-norm" and scale_factor is not None:
        # ours divides by num_seqs * T; verl by num_seqs * loss_scale_factor
        if num_items is None:
            num_items = (mask != 0).any(dim=-1).sum().to(torch.float64)
        num_items = num_items * scale_factor / mask.shape[-1]
    return loss_agg_mode, num_items


def _policy_loss(
    algo: str,
    overrides: Mapping[str, Any],
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    agg, num_items = verl_aggregation(loss_agg_mode, response_mask, _lookup(config, "global_batch_info"))
    loss_config = loss_config_from_verl(algo, config, **overrides).replace(agg=agg)
    loss, metrics = rpg_loss(
        log_prob,
        old_log_prob,
        advantages,
        response_mask,
        config=loss_config,
        num_items=num_items,
        rollout_weights=rollout_is_weights,
    )
    with torch.no_grad():
        mask = (response_mask != 0).to(torch.float32)
        approx_kl = torch.where(response_mask != 0, old_log_prob - log_prob, 0.0).float().sum()
        approx_kl = approx_kl / mask.sum().clamp(min=1.0)
    pg_metrics = {
        "actor/pg_clipfrac": metrics["clip_frac"].item(),
        "actor/pg_clipfrac_lower": metrics["clip_frac_dual"].item(),
        "actor/ppo_kl": approx_kl.item(),
    }
    pg_metrics.update({f"actor/rpg_{name}": value.item() for name, value in metrics.items()})
    return loss, pg_metrics


def compute_policy_loss_rpg(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Fully differentiable RPG (docs/MATH.md §3 ``rpg``): ``DC(w, A) + beta * Omega``; verl's signature.

    ``old_log_prob``, ``log_prob``, ``response_mask`` ``[B, T]``; ``advantages`` ``[B, T]`` or ``[B]``.
    Returns ``(loss 0-d, metrics dict of floats)``.
    """
    return _policy_loss(
        "rpg",
        {},
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )


def compute_policy_loss_rpg_reinforce(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """REINFORCE-style RPG (docs/MATH.md §3 ``rpg_reinforce``, RPG-style clip by default); verl's API."""
    return _policy_loss(
        "rpg_reinforce",
        {},
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        loss_agg_mode,
        config,
        rollout_is_weights,
    )


POLICY_LOSSES: dict[str, PolicyLossFn] = {
    "rpg": compute_policy_loss_rpg,
    "rpg_reinforce": compute_policy_loss_rpg_reinforce,
}


def _policy_loss_config_class() -> type:
    """verl's ``PolicyLossConfig`` plus the ``rpg_*`` fields (built on first use: needs verl)."""
    from verl.workers.config import PolicyLossConfig

    @dataclasses.dataclass
    class RPGPolicyLossConfig(PolicyLossConfig):
        """verl's ``PolicyLossConfig`` with RPG's options (``_target_`` of ``actor.policy_loss``)."""

        rpg_kl: str = _RPG_OPTIONS["rpg_kl"]
        rpg_beta: float = _RPG_OPTIONS["rpg_beta"]
        rpg_clip_mode: str = _RPG_OPTIONS["rpg_clip_mode"]
        rpg_kl_clamp: Optional[float] = _RPG_OPTIONS["rpg_kl_clamp"]  # noqa: UP045 (OmegaConf needs Optional)

    RPGPolicyLossConfig.__module__ = __name__
    return RPGPolicyLossConfig


def __getattr__(name: str) -> Any:
    if name == "RPGPolicyLossConfig":
        globals()[name] = _policy_loss_config_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_verl(name: str | None = None, algo: str = "rpg_reinforce", **options: Any) -> bool:
    """Register the RPG losses in verl's policy-loss registry; ``False`` when verl is not importable.

    Without arguments registers ``rpg`` and ``rpg_reinforce`` (options from verl's config). With ``name``
    registers one extra loss of ``algo`` whose ``options`` (``rpg_kl``, ``rpg_beta``, ``rpg_clip_mode``,
    ``rpg_kl_clamp``, ``clip_ratio_c``) are fixed, e.g.
    ``register_with_verl("rpg_fkl", "rpg", rpg_kl="fkl")``; it is also added to ``POLICY_LOSSES``.
    """
    if algo not in ("rpg", "rpg_reinforce"):
        raise ValueError(f"algo: expected 'rpg' or 'rpg_reinforce', got {algo!r}")
    if name is not None:
        loss_config_from_verl(algo, None, **options)  # validate now, not at the first training step
        fn = functools.partial(_policy_loss, algo, dict(options))
        functools.update_wrapper(fn, POLICY_LOSSES[algo])
        POLICY_LOSSES[name] = fn
        targets = {name: fn}
    else:
        targets = dict(POLICY_LOSSES)
    try:
        from verl.trainer.ppo.core_algos import register_policy_loss
    except ImportError:
        return False
    for loss_name, fn in targets.items():
        register_policy_loss(loss_name)(fn)
    return True


@dataclasses.dataclass
class FusedCausalLMOutput:
    """What verl reads from a fused-kernel forward: per-position ``log_probs`` and ``entropy`` ``[B, S]``."""

    log_probs: Tensor
    entropy: Tensor
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def fused_causal_lm_forward(
    self: torch.nn.Module,
    input_ids: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: Tensor | None = None,
    labels: Tensor | None = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
    cache_position: Tensor | None = None,
    logits_to_keep: int | Tensor = 0,
    temperature: float = 1.0,
    shift_labels: Tensor | None = None,
    **unused_kwargs: Any,
) -> FusedCausalLMOutput:
    """verl's fused-kernel ``forward`` for a ``*ForCausalLM``, with ``rpg_kernels.fused_linear_logprobs``.

    Position ``s`` of ``log_probs``/``entropy`` ``[B, S]`` scores the next label: ``shift_labels[:, s]`` if
    given, else ``roll(labels or input_ids, -1)[:, s]`` (the last position wraps around; verl masks it).
    """
    import rpg_kernels as rk

    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        output_attentions=output_attentions,
        output_hidden_states=output_hidden_states,
        cache_position=cache_position,
    )
    hidden = outputs[0]
    if shift_labels is not None:
        next_labels = shift_labels
    elif labels is not None or input_ids is not None:
        next_labels = torch.roll(labels if labels is not None else input_ids, shifts=-1, dims=-1)
    else:
        raise ValueError("input_ids: fused_causal_lm_forward needs input_ids, labels or shift_labels")
    weight, bias = lm_head_params(self)
    backend = "torch" if hidden.device.type == "cpu" else "auto"
    log_probs, entropy = rk.fused_linear_logprobs(
        hidden, weight, next_labels, bias=bias, temperature=temperature, return_entropy=True, backend=backend
    )
    return FusedCausalLMOutput(
        log_probs=log_probs,
        entropy=entropy,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def use_rpg_fused_forward_in_verl() -> bool:
    """Route verl's Triton fused-kernel forward (dense text models) to `fused_causal_lm_forward`.

    Call it in every worker before the model is built (this module calls it on import when
    ``RPG_KERNELS_VERL_FUSED=1``). Returns ``False`` when verl is not importable.
    """
    try:
        from verl.models.transformers import dense_common
    except ImportError:
        return False
    dense_common.forward_with_triton_backend = fused_causal_lm_forward
    return True


register_with_verl()
if os.environ.get("RPG_KERNELS_VERL_FUSED", "0") == "1":
    use_rpg_fused_forward_in_verl()
