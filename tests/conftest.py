"""Test-wide set-up.

On a machine without CUDA the Triton kernels run through the interpreter, which must be enabled before
anything imports Triton; so it is set here, first. (The repository root is on ``sys.path`` through
``pythonpath`` in pyproject.toml, so tests import shared helpers as ``tests.support`` etc.)
"""

import os
import shutil

if not shutil.which("nvidia-smi") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
