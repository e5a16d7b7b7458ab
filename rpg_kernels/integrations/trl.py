"""TRL's ``GRPOTrainer`` with the fused RPG-family loss: hidden states + LM head, never ``[N, V]`` logits.

::

    from rpg_kernels.integrations.trl import RPGGRPOConfig, RPGGRPOTrainer

    args = RPGGRPOConfig(output_dir="out", loss_type="dapo", rpg_algo="rpg_reinforce", rpg_kl="urkl",
                         beta=1e-4, epsilon=0.2, epsilon_high=0.28, rpg_clip_c=10.0)
    trainer = RPGGRPOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset)
    trainer.train()

How TRL's settings map onto `rpg_kernels.LossConfig` (see `loss_config_from_grpo_args`):

* ``rpg_algo``: ``None`` keeps TRL's own loss (``loss_type`` ``grpo``/``bnpo``/``dr_grpo``/``dapo``/``luspo``:
  PPO clip; ``importance_sampling_level="sequence"``: GSPO; ``cispo``: CISPO), computed by our kernels.
  ``"rpg"`` / ``"rpg_reinforce"`` (or any other algo name) switch to that loss.
* ``loss_type`` always chooses the *normalisation*, exactly as TRL does (including its gradient-accumulation
  scaling): ``grpo`` → seq-mean-token-mean, ``luspo`` → seq-mean-token-sum, ``bnpo`` → local token-mean,
  ``dapo``/``cispo`` → global token-mean, ``dr_grpo`` → sum / (B * ``max_completion_length``).
* ``beta`` → ``LossConfig.beta``; ``epsilon``/``epsilon_high`` → ``eps_low``/``eps_high`` (for ``cispo``
  TRL's ``epsilon_high`` is the absolute weight cap, so ``eps_high = epsilon_high - 1``);
  ``temperature`` → the fused kernels' temperature; ``use_bias_correction_kl`` → ``kl_estimator="k3_is"``.
* ``delta`` (TRL's two-sided clip) → ``clip_c = delta`` (the same loss when ``delta > 1 + epsilon_high``).
* The constant weights TRL puts on its policy term -- the vLLM importance-sampling correction
  (``vllm_importance_sampling_correction``, on by default with ``use_vllm``: TRL's own
  ``importance_sampling_ratio``, any of its four modes), the off-policy sequence mask
  (``off_policy_mask_threshold``) and the high-entropy token mask (``top_entropy_quantile``) -- are passed
  as ``rollout_weights`` (docs/MATH.md §9). The two masks need the current policy's log-probs and
  entropies: one extra no-grad pass of the fused head (``2 N H V`` flops) on the hidden states already
  computed, through TRL's own ``get_off_policy_mask`` / ``get_high_entropy_mask``.
* RPG's own knobs: ``rpg_kl``, ``rpg_clip_mode``, ``rpg_clip_c``, ``rpg_kl_clamp``, ``rpg_kl_estimator``.
* ``rpg_reference``: ``"old"`` (RPG's iterative reference, the sampling policy: no reference model is
  loaded, whatever ``beta``) or ``"model"`` (TRL's frozen reference model, loaded when ``beta > 0``).
  Default: ``"old"`` for the RPG algos, ``"model"`` otherwise.

Our metrics are logged through TRL's logger as ``rpg/<name>`` (plus TRL's ``kl``, ``entropy`` and
``clip_ratio/*`` names). Supported TRL versions: `SUPPORTED_TRL`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import trl
from packaging.version import Version
from torch import Tensor
from trl import GRPOConfig, GRPOTrainer

from rpg_kernels.config import BACKENDS, RPG_ALGOS, LossConfig
from rpg_kernels.integrations.hf import (
    completion_hidden_states,
    lm_head_params,
    run_inside_forward,
    unwrap_model,
)

__all__ = ["RPGGRPOConfig", "RPGGRPOTrainer", "SUPPORTED_TRL", "loss_config_from_grpo_args"]

SUPPORTED_TRL = (">=1.16", "<1.17")
_TRL_LOW, _TRL_HIGH = Version("1.16.0"), Version("1.17.0")


def _check_trl_version(version: str) -> None:
    if not _TRL_LOW <= Version(version) < _TRL_HIGH:
        raise ImportError(
            f"rpg_kernels.integrations.trl supports trl{','.join(SUPPORTED_TRL)} (it overrides "
            f"GRPOTrainer._compute_loss, whose inputs change between TRL releases); found trl {version}. "
            'Install a supported version: pip install "rpg-kernels[integrations]"'
        )


_check_trl_version(trl.__version__)

_PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
_AGG_OF_LOSS_TYPE = {
    "grpo": "seq-mean-token-mean",
    "luspo": "seq-mean-token-sum",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "dr_grpo": "token-mean",  # with num_items = B * max_completion_length, as TRL normalises
}
_REFERENCES = ("old", "model")


@dataclass
class RPGGRPOConfig(GRPOConfig):
    """`trl.GRPOConfig` plus the RPG loss knobs (see the module docstring for the mapping)."""

    rpg_algo: str | None = field(
        default=None,
        metadata={"help": "rpg_kernels algo (rpg, rpg_reinforce, grpo, ...); None: TRL's own loss_type."},
    )
    rpg_kl: str = field(default="urkl", metadata={"help": "RPG divergence: fkl, rkl, ufkl, urkl."})
    rpg_clip_mode: str = field(default="dual", metadata={"help": "none, truncate (rpg_reinforce), dual."})
    rpg_clip_c: float | None = field(
        default=None, metadata={"help": "Dual-clip bound c > 1; None: 10 for RPG algos, inf (off) otherwise."}
    )
    rpg_kl_clamp: float | None = field(default=None, metadata={"help": "Clamp the KL term to +-kl_clamp."})
    rpg_kl_estimator: str | None = field(
        default=None, metadata={"help": "Baselines with beta > 0: k1, k2, k3, k3_is; None: TRL's k3 (k3_is)."}
    )
    rpg_reference: str | None = field(
        default=None,
        metadata={"help": "old: iterative reference (sampler); model: TRL's reference model. None: by algo."},
    )
    rpg_backend: str = field(
        default="auto", metadata={"help": "auto (torch on CPU, Triton on CUDA), torch or triton."}
    )


def _rpg_option(args: GRPOConfig, name: str, default: Any) -> Any:
    return getattr(args, name, default)


def reference_mode(args: GRPOConfig) -> str:
    """``"old"`` or ``"model"``: which reference the KL term uses (see the module docstring)."""
    algo = _rpg_option(args, "rpg_algo", None)
    reference = _rpg_option(args, "rpg_reference", None)
    if reference is None:
        return "old" if algo in RPG_ALGOS else "model"
    if reference not in _REFERENCES:
        raise ValueError(f"rpg_reference: expected one of {_REFERENCES}, got {reference!r}")
    return reference


def _check_supported(args: GRPOConfig) -> None:
    """Refuse, with TRL's default and the change to make, what the RPG loss cannot express."""
    if args.use_adaptive_entropy:
        raise ValueError(
            "use_adaptive_entropy: TRL's adaptive entropy bonus is not supported by RPGGRPOTrainer (TRL's "
            "default is False); set use_adaptive_entropy=False and a fixed entropy_coef"
        )
    if args.top_entropy_quantile < 1.0 and args.entropy_coef != 0.0:
        raise ValueError(
            "top_entropy_quantile: with an entropy bonus TRL normalises the bonus over the high-entropy "
            "tokens only, which the RPG loss does not; keep TRL's default top_entropy_quantile=1.0 or set "
            "entropy_coef=0"
        )
    if args.loss_type not in _AGG_OF_LOSS_TYPE:
        raise ValueError(
            f"loss_type={args.loss_type!r} is not supported by the RPG loss; "
            f"use one of {sorted(_AGG_OF_LOSS_TYPE)} (TRL's default is 'dapo')"
        )


def loss_config_from_grpo_args(args: GRPOConfig) -> LossConfig:
    """The `LossConfig` equivalent to a `GRPOConfig` (or `RPGGRPOConfig`) for one micro-batch.

    Raises ``ValueError`` naming the TRL option when the combination has no equivalent.
    """
    _check_supported(args)
    reference_mode(args)
    backend = _rpg_option(args, "rpg_backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"rpg_backend: expected one of {BACKENDS}, got {backend!r}")
    algo = _rpg_option(args, "rpg_algo", None)
    sequence_level = args.importance_sampling_level == "sequence"
    eps_low = args.epsilon
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if algo is None:
        if args.loss_type == "cispo":
            if sequence_level:
                raise ValueError("importance_sampling_level='sequence' does not work with loss_type='cispo'")
            # TRL caps the weight at epsilon_high (absolute) and has no lower clip
            algo, eps_low, eps_high = "cispo", None, eps_high - 1.0
            if eps_high <= 0:
                raise ValueError(
                    "epsilon_high: for loss_type='cispo' TRL caps the weight at epsilon_high "
                    f"(recommended 5.0); it must be > 1, got {eps_high + 1.0}"
                )
        else:
            algo = "gspo" if sequence_level else "grpo"
    elif sequence_level and algo != "gspo":
        raise ValueError(
            f"importance_sampling_level='sequence' is GSPO; it does not combine with rpg_algo={algo!r}"
        )

    clip_c = _rpg_option(args, "rpg_clip_c", None)
    if args.delta is not None:  # TRL's two-sided clip is the dual clip with c = delta
        if algo in RPG_ALGOS or algo == "cispo":
            raise ValueError(
                f"delta: TRL's two-sided clipping applies to its PPO-style losses, not to {algo!r} (TRL's "
                "default is None); for the RPG algos set rpg_clip_c instead"
            )
        if not args.delta > 1.0 + eps_high:
            raise ValueError(
                f"delta: it must exceed 1 + epsilon_high = {1.0 + eps_high} for TRL's two-sided clip to be "
                f"the dual clip, got {args.delta} (TRL's default is None)"
            )
        if clip_c is not None:
            raise ValueError("delta and rpg_clip_c: both set the dual-clip bound; give one")
        clip_c = float(args.delta)
    overrides: dict[str, Any] = dict(
        beta=args.beta,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_mode=_rpg_option(args, "rpg_clip_mode", "dual"),
        agg=_AGG_OF_LOSS_TYPE[args.loss_type],
        kl_clamp=_rpg_option(args, "rpg_kl_clamp", None),
    )
    if algo in RPG_ALGOS:
        overrides.update(kl=_rpg_option(args, "rpg_kl", "urkl"), clip_c=10.0 if clip_c is None else clip_c)
    else:
        estimator = _rpg_option(args, "rpg_kl_estimator", None)
        if estimator is None and args.beta != 0.0:
            if args.use_bias_correction_kl and sequence_level:
                raise ValueError(
                    "use_bias_correction_kl: with importance_sampling_level='sequence' TRL weights the KL "
                    "by the sequence ratio, our k3_is by the token ratio; set use_bias_correction_kl=False "
                    "(k3) or rpg_kl_estimator='k3_is' (token-weighted)"
                )
            estimator = "k3_is" if args.use_bias_correction_kl else "k3"
        overrides.update(kl_estimator=estimator, clip_c=float("inf") if clip_c is None else clip_c)
    return LossConfig.preset(algo, **overrides)


class RPGGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose loss is `rpg_kernels.fused_linear_rpg_loss` on the model's hidden states.

    Generation, rewards, advantages, reference/old log-probs, logging and checkpoints are TRL's. Only the
    training loss changes: the backbone's completion hidden states and the LM-head weight go to the fused
    kernel, which never builds ``[tokens, vocab]`` logits. Works with DDP/FSDP/DeepSpeed (the loss runs inside
    the wrapped model's forward) and PEFT.
    """

    def __init__(self, *args_: Any, args: GRPOConfig | None = None, **kwargs: Any) -> None:
        if args is None:
            raise ValueError("args: pass an RPGGRPOConfig (or a GRPOConfig) explicitly")
        self.loss_config = loss_config_from_grpo_args(args)
        self.rpg_reference = reference_mode(args)
        self.rpg_backend = _rpg_option(args, "rpg_backend", "auto")
        # RPG's iterative reference is the sampler: keep TRL from loading (and running) a reference model.
        beta = args.beta
        if self.rpg_reference == "old":
            args.beta = 0.0
        try:
            super().__init__(*args_, args=args, **kwargs)
        finally:
            args.beta = beta

    def _normaliser(self, inputs: dict[str, Any], mask: Tensor, mode: str) -> Tensor | float:
        """``num_items`` giving TRL's normalisation of ``loss_type`` (gradient accumulation included)."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        batch = mask.shape[0]
        if self.loss_type in ("grpo", "luspo"):
            return batch * accumulation  # sequences
        if self.loss_type == "bnpo":
            return mask.sum().clamp(min=1.0) * accumulation
        if self.loss_type == "dr_grpo":
            return batch * self.max_completion_length * accumulation
        # dapo, cispo: the generation batch's token count, rescaled to one accumulation window per process
        normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normaliser = normaliser * accumulation / self.args.steps_per_generation
        return normaliser

    def _entropy_coef(self, mask: Tensor, num_items: Tensor | float, mode: str) -> float:
        """Our coefficient on ``sum(entropy * loss_weights)`` that gives TRL's bonus, ``entropy_coef *
        token-mean(entropy) / accumulation``, for the token-mean losses (seq-mean losses: their weights)."""
        if not self._entropy_bonus_enabled or self.entropy_coef == 0.0:
            return 0.0
        if self.loss_config.agg != "token-mean":
            return float(self.entropy_coef)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        tokens = float(mask.sum().clamp(min=1.0))
        return float(self.entropy_coef) * float(num_items) / (tokens * accumulation)

    def _backend_for(self, device: torch.device) -> str:
        if self.rpg_backend == "auto" and device.type == "cpu":
            return "torch"  # the Triton interpreter would be far slower than the chunked PyTorch path
        return self.rpg_backend

    def _head_context(self, hidden: Tensor, weight: Tensor, bias: Tensor | None):
        """With ``cast_lm_head_to_fp32`` the head runs in fp32 outside autocast, as TRL's own head does;
        otherwise the fused functions follow autocast themselves."""
        if not self.args.cast_lm_head_to_fp32:
            return hidden, weight, bias, nullcontext()
        bias = None if bias is None else bias.float()
        return hidden.float(), weight.float(), bias, torch.autocast(hidden.device.type, enabled=False)

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> Tensor:
        import rpg_kernels as rk

        if inputs.get("pixel_values") is not None:
            raise ValueError("inputs: multimodal models are not supported by RPGGRPOTrainer")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE load-balancing loss is not supported here")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        old_logprobs = inputs.get("old_per_token_logps")
        ref_logprobs = inputs.get("ref_per_token_logps") if self.rpg_reference == "model" else None
        mode = "train" if self.model.training else "eval"
        num_items = self._normaliser(inputs, mask, mode)
        entropy_coef = self._entropy_coef(mask, num_items, mode)

        def fused_loss() -> tuple[Tensor, dict[str, Tensor]]:
            causal_lm = unwrap_model(model)
            hidden = completion_hidden_states(causal_lm, input_ids, attention_mask, completion_ids.shape[1])
            weight, bias = lm_head_params(causal_lm)
            hidden, weight, bias, head_context = self._head_context(hidden, weight, bias)
            backend = self._backend_for(hidden.device)
            with head_context:
                current = None  # the policy's own detached log-probs and entropies, when a mask needs them
                if old_logprobs is None or self._needs_current_policy():
                    with torch.no_grad():
                        current = rk.fused_linear_logprobs(
                            hidden,
                            weight,
                            completion_ids,
                            bias=bias,
                            temperature=self.temperature,
                            return_entropy=True,
                            backend=backend,
                        )
                # on-policy step: TRL skips the old-policy pass, the ratio is exactly 1
                old = current[0] if old_logprobs is None else old_logprobs
                return rk.fused_linear_rpg_loss(
                    hidden,
                    weight,
                    completion_ids,
                    old,
                    inputs["advantages"],
                    mask,
                    ref_logprobs,
                    config=self.loss_config,
                    temperature=self.temperature,
                    bias=bias,
                    entropy_coef=entropy_coef,
                    num_items=num_items,
                    rollout_weights=self._policy_term_weights(inputs, mask, old, current),
                    backend=backend,
                )

        with self.accelerator.autocast():
            loss, metrics = run_inside_forward(model, fused_loss)
        self._log_rpg_metrics(metrics, mode)
        return loss

    def _needs_current_policy(self) -> bool:
        return self.off_policy_mask_threshold is not None or self.top_entropy_quantile < 1.0

    def _policy_term_weights(
        self, inputs: dict[str, Any], mask: Tensor, old: Tensor, current: tuple[Tensor, Tensor] | None
    ) -> Tensor | None:
        """The constant per-token weights TRL multiplies its policy term by (docs/MATH.md §9), in TRL's order:
        the off-policy sequence mask, the high-entropy mask, and the vLLM importance-sampling ratio (TRL's
        own ``importance_sampling_ratio``, any of its four modes). ``None`` when none is on."""
        weights = None
        if self.off_policy_mask_threshold is not None:
            advantages = inputs["advantages"]
            advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
            weights = GRPOTrainer.get_off_policy_mask(
                advantages=advantages,
                per_token_logps=current[0],
                sampling_per_token_logps=inputs.get("sampling_per_token_logps", old),
                mask=mask,
                off_policy_threshold=self.off_policy_mask_threshold,
            ).float()
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(current[1], mask, 1 - self.top_entropy_quantile).float()
            weights = entropy_mask if weights is None else weights * entropy_mask
        if self.use_vllm and self.vllm_importance_sampling_correction:
            ratio = inputs["importance_sampling_ratio"]
            weights = ratio if weights is None else weights * ratio
        return weights

    def _log_rpg_metrics(self, metrics: dict[str, Tensor], mode: str) -> None:
        """Average over processes (``ratio_max``: max, ``num_tokens``: sum) into TRL's metric buffers."""
        trl_names = {
            "kl": "kl",
            "entropy": "entropy",
            "clip_frac_low": "clip_ratio/low_mean",
            "clip_frac_high": "clip_ratio/high_mean",
            "clip_frac": "clip_ratio/region_mean",
        }
        for name, value in metrics.items():
            gathered = self.accelerator.gather(
                torch.as_tensor(value, dtype=torch.float32, device=self.accelerator.device).reshape(1)
            )
            reduce = {"ratio_max": torch.max, "num_tokens": torch.sum}.get(name, torch.mean)
            value = reduce(gathered).item()
            self._metrics[mode][f"rpg/{name}"].append(value)
            if name in trl_names and (name != "kl" or self.loss_config.beta != 0.0):
                self._metrics[mode][trl_names[name]].append(value)
