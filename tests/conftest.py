"""Test-wide set-up.

On a machine without CUDA the Triton kernels run through the interpreter, which must be
enabled before anything imports Triton; so it is set here, first. The repository root goes on
``sys.path`` so that `tests.support` imports however pytest is started (spawned workers inherit it).
"""

import os
import shutil
import sys
from pathlib import Path

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
