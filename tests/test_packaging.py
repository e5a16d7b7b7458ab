"""The wheel users install: floors only, two top-level packages, and an install that leaves an existing
torch/triton alone (a CUDA torch pins its own Triton)."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import bench
import rpg_kernels

ROOT = Path(__file__).resolve().parents[1]
# pip with no configuration files (this machine's global pip.conf adds constraints and mirrors)
PIP_ENV = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built from a copy of the sources (the checkout gets no build/ folder)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("rpg_kernels", "rpg_train", "bench"):  # bench/ is copied to prove it stays out
        shutil.copytree(
            ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        env=PIP_ENV,
        cwd=src,
    )
    (path,) = out.glob("rpg_kernels-*.whl")
    return path


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


def test_wheel_requires_floors_only(wheel):
    meta = _metadata(wheel)
    assert meta["Version"] == rpg_kernels.__version__
    requires = meta.get_all("Requires-Dist")
    runtime = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split(">=")[0].split(";")[0].strip() for r in runtime) == ["torch", "triton"]
    specifiers = {r: r.split(";")[0] for r in requires}
    assert not [r for r, spec in specifiers.items() if "==" in spec], "exact pins reach users"
    # the one cap: TRL, whose GRPOTrainer internals the integration overrides
    assert [r for r, spec in specifiers.items() if "<" in spec] == [
        'trl<1.17,>=1.16; extra == "integrations"'
    ]
    assert not any(r.lower().startswith("numpy") for r in runtime), "rpg_kernels imports no NumPy"


def test_wheel_ships_only_the_two_packages(wheel):
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
    packages = {name for name in top_level if not name.endswith((".dist-info", ".data"))}
    assert packages == {"rpg_kernels", "rpg_train"}


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal installable wheel standing for a user's existing ``name==version``."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for n, text in {**files, f"{info}/RECORD": record}.items():
            archive.writestr(n, text)
    return path


def test_install_keeps_the_existing_torch_and_triton(wheel, tmp_path):
    """A CUDA environment with a newer torch and its own Triton: installing our wheel changes neither."""
    env_dir, wheels = tmp_path / "venv", tmp_path / "wheels"
    wheels.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    existing = [_fake_wheel(wheels, "torch", "2.15.0"), _fake_wheel(wheels, "triton", "3.7.1")]
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels)]
    subprocess.run([*pip, *map(str, existing)], check=True, env=PIP_ENV)
    subprocess.run([*pip, str(wheel)], check=True, env=PIP_ENV)
    versions = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('torch'), m.version('triton'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert versions == ["2.15.0", "3.7.1"]


def test_bench_results_never_go_into_site_packages(tmp_path):
    assert bench.results_root() == ROOT / "bench" / "results"  # from this checkout
    installed = tmp_path / "lib" / "python3.11" / "site-packages" / "bench"
    installed.mkdir(parents=True)
    (installed.parent / "pyproject.toml").write_text("")
    assert bench.results_root(installed, cwd=tmp_path) == tmp_path / "bench-results"
    assert bench.results_root(tmp_path / "elsewhere" / "bench", cwd=tmp_path) == tmp_path / "bench-results"
