"""Kernels and autograd Functions of the fused linear log-probs (docs/MATH.md §6), one kernel family per file.

- ``linear_logprobs_forward.py``: Triton forward (logits tiles, online log-sum-exp, target, entropy).
- ``linear_logprobs_backward.py``: Triton backward (recompute tiles, ``dz``, then ``dh`` / ``dW`` / ``db``).
- ``chunked.py``: the same math in PyTorch, chunked over tokens and vocabulary (CPU tensors).
- ``autograd.py``: the ``torch.autograd.Function``s; ``dispatch.py``: backend choice.
- ``tile_configs.py``: tile shapes per GPU architecture; ``aot.py``: compile for sm_80/sm_90 without a GPU.

Nothing is imported here, so that importing one module does not import Triton.
"""
