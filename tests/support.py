"""What several test folders share: tiny causal LMs built from configs (no hub download), and the
allocation recorder behind the no-``[N, V]``-logits tests."""

from __future__ import annotations

import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

TINY_LM = dict(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
_CONFIGS = {
    "qwen2": transformers.Qwen2Config,
    "llama": transformers.LlamaConfig,
    "qwen3": transformers.Qwen3Config,
}


def tiny_causal_lm(
    family: str = "qwen2", *, tie_word_embeddings: bool = False, seed: int = 0, **sizes: int
) -> transformers.PreTrainedModel:
    """A float32 ``*ForCausalLM`` of ``family`` ("qwen2", "llama", "qwen3") in eval mode.

    ``sizes`` override `TINY_LM` (``vocab_size``, ``hidden_size``, ...). Every parameter, the norms
    included, gets noise, so that no weight keeps its trivial initial value.
    """
    extra = {"head_dim": 8} if family == "qwen3" else {}
    config = _CONFIGS[family](
        **{**TINY_LM, **sizes}, **extra, tie_word_embeddings=tie_word_embeddings, attn_implementation="eager"
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


class LargestAllocation(TorchDispatchMode):
    """While active, records the largest tensor that any ATen op returns, views included: ``largest``
    elements (made by ``op``) and ``largest_bytes``; counts the ops (``ops``)."""

    def __init__(self):
        super().__init__()
        self.largest, self.largest_bytes, self.op, self.ops = 0, 0, None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                if leaf.numel() > self.largest:
                    self.largest, self.op = leaf.numel(), str(func)
                self.largest_bytes = max(self.largest_bytes, leaf.numel() * leaf.element_size())
        return out
