"""A pytest plugin for ``--collect-only`` runs: torch reports a CUDA device, so the parametrisations that
exist only on CUDA (bf16, tests/ops/ops_reference.py) are collected. Never for running tests."""

import torch

torch.cuda.is_available = lambda: True
