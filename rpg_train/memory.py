"""What fits: the memory a rank needs, estimated from a model config, and the states a rank measurably holds.

    python -m rpg_train.memory                          # the table of docs/TRAINING.md (the paper's models)
    python -m rpg_train.memory --model /models/Qwen2.5-Math-7B --ranks 8 --parallel fsdp --response 4096
    python -m bench.readme                              # (in a checkout) writes that table into the page

`estimate` adds up, per rank (bytes; ``P`` parameters, ``W`` ranks, shard ``s = W`` under fsdp, else 1):

- states: fp32 master weights ``4P/s``, gradients ``4P/s``, AdamW's two moments ``8P/s``
  (``train.fsdp_offload`` moves them to CPU memory), a frozen fp32 reference ``4P/s`` if ``algo.ref_update``
  keeps one;
- DDP's gradient buckets ``4P`` (several ranks), or FSDP's gathered parameters: the root group (embedding,
  final norm, LM head) and two decoder layers (the current and the prefetched) in the compute dtype, and one
  layer's unsharded gradients;
- activations of one micro-batch of ``T = micro_batch_seqs x sequence length`` tokens: with gradient
  checkpointing the residual stream at every layer's input (``L T H``) plus one layer recomputed in full;
  without it, every layer in full; a layer saves, per token, ``2(4+a)H`` for its two RMSNorms (fp32 inside),
  ``a(3H + 3H_kv)`` for q, k, v, rotated q, k and the attention output (flash/SDPA: no ``S x S`` scores), and
  ``4aI`` for the SwiGLU MLP (``a``: the compute dtype's bytes, bf16 on CUDA, fp32 on CPU); its backward
  needs ``a T (2I + 2H)`` more; the hidden states' fp32 gradient ``4TH`` waits from the loss to the backward;
- the fused loss's workspace, in the forward (its blocks are freed before the backward): on CUDA the single
  pass's fp32 ``[C, V]`` logits chunk and its 16-bit ``dz``, at most ``DEFAULT_WORKSPACE_BYTES``, plus its
  fp32 ``dW`` accumulator ``4 V H``; on CPU the chunked path's block of whole fp32 rows, at most
  ``TORCH_WORKSPACE_BYTES``, its two cache-sized scratch buffers and the same accumulator;
- AdamW's step, when the activations are freed: foreach AdamW (CUDA) a temporary of ``4P/s``, per-parameter
  AdamW (CPU) one of the embedding's size;
- vLLM: ``gpu_memory_utilization x GPU`` while it generates (the trainer's weights and optimizer states stay
  resident then), nothing while it sleeps (weights offloaded to the CPU, KV cache freed); on CPU vLLM's KV
  cache lives in ``VLLM_CPU_KVCACHE_SPACE`` and is left out.

Peak = max(training: states + parallel overhead + max(activations, optimizer step),
rollout: resident states + DDP buckets + vLLM's share) + ``CUDA_CONTEXT_BYTES`` on CUDA. The parameter
counts come from the model itself, built on the meta device from its config. On CPU, `tests/train/
test_memory.py` checks the training estimate against the measured peak RSS of a small Qwen2; on GPUs the
estimate has not been checked against a measurement (see docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

MIB, GIB = 1 << 20, 1 << 30
CUDA_CONTEXT_BYTES = GIB  # CUDA context, NCCL buffers and allocator slack per process (an allowance)
PROMPT_TOKENS = 512  # prompt length assumed in the table (sequence = prompt + response)

# The paper's models: the architecture fields of their Hugging Face config.json files.
MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-Math-1.5B": dict(
        model_type="qwen2",
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen3-4B": dict(
        model_type="qwen3",
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-Math-7B": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# measured: what a rank holds


def _storages(tensors) -> dict[int, int]:
    """``{data_ptr: bytes}`` of the distinct storages behind ``tensors`` (a DTensor's local shard)."""
    out = {}
    for tensor in tensors:
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if isinstance(tensor, Tensor) and tensor.numel():
            storage = tensor.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Measured bytes this rank holds for the ``parameters``, their ``gradients`` and the ``optimizer``'s
    states (distinct storages, so tied parameters count once and FSDP shards count as what they are)."""
    params = list(model.parameters())
    states = [value for state in optimizer.state.values() for value in state.values()]
    return {
        "parameters": sum(_storages(params).values()),
        "gradients": sum(_storages(p.grad for p in params if p.grad is not None).values()),
        "optimizer": sum(_storages(states).values()),
    }


# ---------------------------------------------------------------------------------------------------------
# estimated: from a model config


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a causal LM; the parameter counts come from the model built on ``meta``."""

    params: int  # distinct parameters (a tied head counted once)
    layer_params: int  # one decoder layer's
    root_params: int  # outside the decoder layers: embedding, final norm, LM head
    layers: int
    hidden: int
    kv_hidden: int  # key/value heads x head dim
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (or a ``MODELS`` entry, or a model folder holding config.json)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from rpg_train.parallel import decoder_layers

        if isinstance(config, (str, Path)):
            config = AutoConfig.from_pretrained(config)
        elif isinstance(config, dict):
            fields = dict(config)
            config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        layers = decoder_layers(model)
        params = sum(p.numel() for p in model.parameters())
        layer_params = sum(p.numel() for p in layers[0].parameters())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            params=params,
            layer_params=layer_params,
            root_params=params - len(layers) * layer_params,
            layers=len(layers),
            hidden=config.hidden_size,
            kv_hidden=config.num_key_value_heads * head_dim,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
        )


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank, by part (see the module docstring); ``peak`` is what must fit."""

    states: int  # master weights + gradients + optimizer moments (+ frozen reference) on the device
    overhead: int  # DDP buckets or FSDP's gathered parameters / unsharded gradients
    activations: int  # at their peak: checkpointed inputs, a recomputed layer and its backward, or the loss
    loss_workspace: int  # the fused loss's logits blocks (part of ``activations``' peak)
    optimizer_step: int
    vllm: int
    context: int
    training: int  # the training phase's peak
    rollout: int  # the rollout phase's peak
    peak: int
    host_states: int  # what fsdp_offload moved to CPU memory


def estimate(
    shape: ModelShape,
    *,
    ranks: int,
    parallel: str = "fsdp",
    offload: bool = False,
    seq_len: int,
    micro_batch_seqs: int,
    gradient_checkpointing: bool = True,
    device: str = "cuda",
    gpu_memory_utilization: float = 0.5,
    gpu_bytes: int = 81559 * MIB,
    reference: bool = False,
) -> Estimate:
    """The per-rank memory of a run (module docstring) for ``shape`` on ``ranks`` ranks."""
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel must be ddp or fsdp, got {parallel!r}")
    if offload and parallel != "fsdp":
        raise ValueError("offload needs parallel=fsdp")
    from rpg_kernels.ops.chunked import ROW_GROUP_ELEMENTS
    from rpg_kernels.ops.lm_head import DEFAULT_WORKSPACE_BYTES, TORCH_WORKSPACE_BYTES

    cuda = device == "cuda"
    a = 2 if cuda else 4  # compute dtype bytes: bf16 on CUDA (autocast / FSDP mixed precision), fp32 on CPU
    p, shard, h, v = shape.params, ranks if parallel == "fsdp" else 1, shape.hidden, shape.vocab
    weights = 4 * p // shard
    sharded = (4 + int(reference)) * weights  # weights, gradients, two moments (and a frozen reference)
    states, host = (0, sharded) if offload else (sharded, 0)
    if parallel == "ddp":
        overhead = 4 * p if ranks > 1 else 0  # gradient buckets
        residual = 4  # fp32 weights: the residual stream stays fp32 under autocast
    else:
        gathered = a * (shape.root_params + 2 * shape.layer_params) + max(a, 4) * shape.layer_params
        overhead = gathered if ranks > 1 or offload else 0
        residual = a
    tokens = micro_batch_seqs * seq_len
    per_token_layer = 2 * (4 + a) * h + a * (3 * h + 3 * shape.kv_hidden) + 4 * a * shape.intermediate
    saved = shape.layers * tokens * (h * residual if gradient_checkpointing else per_token_layer)
    recompute = tokens * per_token_layer if gradient_checkpointing else 0
    backward = a * tokens * (2 * shape.intermediate + 2 * h)
    if cuda:
        loss_workspace = min(DEFAULT_WORKSPACE_BYTES, (4 + a) * tokens * v) + 4 * v * h
    else:
        scratch = 2 * 4 * min(ROW_GROUP_ELEMENTS, tokens * v)
        loss_workspace = min(TORCH_WORKSPACE_BYTES, 4 * tokens * v) + scratch + 4 * v * h
    # the fused loss runs (and frees its blocks) in the forward, leaving the hidden states' fp32 gradient
    activations = saved + 4 * tokens * h + max(loss_workspace, recompute + backward)
    # foreach AdamW (CUDA) has a temporary as large as its shard; per-parameter AdamW (CPU) one parameter's
    optimizer_step = 0 if offload else (weights if cuda else 4 * v * h // shard)
    vllm = int(gpu_memory_utilization * gpu_bytes) if cuda else 0
    context = CUDA_CONTEXT_BYTES if cuda else 0
    training = states + overhead + max(activations, optimizer_step)
    resident = states - (0 if offload else weights)  # gradients are freed between steps
    rollout = resident + (overhead if parallel == "ddp" else 0) + vllm
    return Estimate(
        states=states,
        overhead=overhead,
        activations=activations,
        loss_workspace=loss_workspace,
        optimizer_step=optimizer_step,
        vllm=vllm,
        context=context,
        training=training + context,
        rollout=rollout + context,
        peak=max(training, rollout) + context,
        host_states=host,
    )


# ---------------------------------------------------------------------------------------------------------
# the docs table

TABLE_RANKS = 8
TABLE_GPUS = {"80 GB": 81559 * MIB, "141 GB": 143771 * MIB}  # H100 / H200 memory as nvidia-smi reports it
TABLE_RESPONSES = (4096, 8192)  # the rpg and rpg_8k presets' max_tokens
TABLE_MODES = (("ddp", False), ("fsdp", False), ("fsdp", True))


def _gb(value: int) -> str:
    return f"{value / GIB:.0f}"


def render() -> str:
    """The table of docs/TRAINING.md (`python -m bench.readme` writes it there): every model x mode x
    length, peak GiB per rank, fits or not."""
    from rpg_train.config import build_config

    cfg = build_config("rpg", overrides=["model.path=/m", "data.train_file=/d"])
    micro, utilization = cfg.train.micro_batch_seqs, cfg.rollout.gpu_memory_utilization
    lines = [
        f"Per rank, {TABLE_RANKS} ranks, the `rpg` preset's settings (micro-batches of {micro} sequences, "
        f"gradient checkpointing, bf16 compute, `rollout.gpu_memory_utilization={utilization}` of the GPU "
        f"for vLLM), sequences of {PROMPT_TOKENS} prompt + response tokens. GiB: states = weights + "
        "gradients + AdamW moments on the GPU; training / rollout = the two phases' peaks on the first GPU "
        "(vLLM's share scales with the GPU); fits = the larger peak is within the GPU's memory:",
        "",
        "| model | params | parallel | response | states | activations | training | rollout | "
        + " | ".join(f"fits {gpu}" for gpu in TABLE_GPUS)
        + " |",
        "|---|---:|---|---:|---:|---:|---:|---:|" + "---|" * len(TABLE_GPUS),
    ]
    for name, config in MODELS.items():
        shape = ModelShape.from_config(config)
        for parallel, offload in TABLE_MODES:
            for response in TABLE_RESPONSES:
                common = dict(
                    ranks=TABLE_RANKS,
                    parallel=parallel,
                    offload=offload,
                    seq_len=PROMPT_TOKENS + response,
                    micro_batch_seqs=micro,
                    gpu_memory_utilization=utilization,
                )
                fits = []
                for gpu_bytes in TABLE_GPUS.values():
                    est = estimate(shape, gpu_bytes=gpu_bytes, **common)
                    fits.append("yes" if est.peak <= gpu_bytes else "no")
                est = estimate(shape, gpu_bytes=next(iter(TABLE_GPUS.values())), **common)
                mode = parallel + (" + offload" if offload else "")
                lines.append(
                    f"| {name} | {shape.params / 1e9:.2f} B | {mode} | {response} | {_gb(est.states)} | "
                    f"{_gb(est.activations)} | {_gb(est.training)} | {_gb(est.rollout)} | "
                    + " | ".join(fits)
                    + " |"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rpg_train.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"a model folder (config.json) or one of {sorted(MODELS)}")
    parser.add_argument("--ranks", type=int, default=TABLE_RANKS)
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="fsdp")
    parser.add_argument("--offload", action="store_true", help="train.fsdp_offload")
    parser.add_argument("--response", type=int, default=TABLE_RESPONSES[0], help="rollout.max_tokens")
    parser.add_argument("--prompt", type=int, default=PROMPT_TOKENS, help="prompt tokens")
    parser.add_argument("--micro-batch", type=int, default=4, help="train.micro_batch_seqs")
    parser.add_argument("--gpu-gib", type=float, default=81559 / 1024, help="GPU memory (default: an H100)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--no-checkpointing", action="store_true", help="model.gradient_checkpointing off")
    parser.add_argument(
        "--reference", action="store_true", help="a frozen reference (ref_update != every_step)"
    )
    args = parser.parse_args(argv)
    if args.model is None:
        print(render())
        return 0
    shape = ModelShape.from_config(MODELS.get(args.model, args.model))
    gpu_bytes = int(args.gpu_gib * GIB)
    est = estimate(
        shape,
        ranks=args.ranks,
        parallel=args.parallel,
        offload=args.offload,
        seq_len=args.prompt + args.response,
        micro_batch_seqs=args.micro_batch,
        gradient_checkpointing=not args.no_checkpointing,
        gpu_memory_utilization=args.gpu_memory_utilization,
        gpu_bytes=gpu_bytes,
        reference=args.reference,
    )
    print(f"{args.model}: {shape.params / 1e9:.2f} B parameters; GiB per rank:")
    for key, value in asdict(est).items():
        print(f"  {key:15s} {value / GIB:8.1f}")
    print(f"fits {args.gpu_gib:.1f} GiB: {'yes' if est.peak <= gpu_bytes else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
