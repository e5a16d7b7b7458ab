"""docs/ARCHITECTURE.md stays true: every module its tables name exists, every backticked dotted name
``package.module.symbol`` resolves."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("rpg_kernels", "rpg_train", "bench")
# "## `rpg_kernels/` ..." sets the folder the tables below it are relative to
SECTION = re.compile(r"^##\s+`([\w/]+/)`")
TABLE_PATH = re.compile(r"^\|\s*((?:`[\w/.]+`(?:,\s*)?)+)\s*\|")
DOTTED = re.compile(r"`((?:rpg_kernels|rpg_train|bench)(?:\.\w+)+)`")


def table_paths() -> list[Path]:
    base, paths = None, []
    for line in DOC.read_text().splitlines():
        if match := SECTION.match(line):
            base = ROOT / match.group(1)
        elif (match := TABLE_PATH.match(line)) and base is not None:
            for name in re.findall(r"`([\w/.]+)`", match.group(1)):
                if name.endswith((".py", "/")):
                    paths.append(base / name)
    return paths


def resolve(dotted: str) -> object:
    """Import the longest importable module prefix of ``dotted`` and get the remaining attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_the_tables_name_existing_modules():
    paths = table_paths()
    assert len(paths) >= 20, "the module tables were not found"
    missing = [str(p.relative_to(ROOT)) for p in paths if not p.exists()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_dotted_names_resolve():
    names = sorted(set(DOTTED.findall(DOC.read_text())))
    assert len(names) >= 10, "docs/ARCHITECTURE.md should name the public pieces as `package.module.symbol`"
    broken = []
    for dotted in names:
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            broken.append(f"{dotted} ({error})")
    assert not broken, f"docs/ARCHITECTURE.md names what does not exist: {broken}"


def test_every_module_is_in_a_table():
    named = {p.resolve() for p in table_paths()}
    folders = {p for p in named if p.is_dir()}
    for package in ("rpg_kernels", "rpg_train"):
        for module in (ROOT / package).rglob("*.py"):
            if module.name == "__init__.py" and module.parent.name in PACKAGES:
                continue
            covered = module.resolve() in named or any(f in module.resolve().parents for f in folders)
            assert covered, f"{module.relative_to(ROOT)} is missing from docs/ARCHITECTURE.md"
