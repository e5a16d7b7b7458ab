"""Side-by-side benchmarks of the fused losses and their peers: ``python -m bench`` from a checkout.

``bench/`` is a folder of the repository, not part of the installed package (the wheel ships only
``rpg_kernels`` and ``rpg_train``). Results go to `results_root`.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def results_root(package_dir: Path = PACKAGE_DIR, cwd: Path | None = None) -> Path:
    """Where runs are written by default: the checkout's ``bench/results/`` when ``bench`` runs from a
    repository (a ``pyproject.toml`` beside it), else ``./bench-results`` -- never into site-packages."""
    in_checkout = (package_dir.parent / "pyproject.toml").is_file()
    if in_checkout and "site-packages" not in package_dir.parts:
        return package_dir / "results"
    return (cwd or Path.cwd()) / "bench-results"
