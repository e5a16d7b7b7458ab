"""Silences the Triton interpreter's own warnings for the kernel tests here."""

from pathlib import Path

import pytest

HERE = Path(__file__).parent

# The interpreter evaluates kernels with NumPy: masked-out lanes may hold inf * 0 (discarded by
# tl.where, as on the GPU), and it uses deprecated NumPy scalar conversions. Not our warnings.
_INTERPRETER_WARNINGS = (
    "ignore::DeprecationWarning:triton.runtime.interpreter",
    "ignore::RuntimeWarning:triton.runtime.interpreter",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            for spec in _INTERPRETER_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))
