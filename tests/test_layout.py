"""The package's layout is part of its design: stages import forward only, and the wheel ships every package."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "streamssl"
# The flow, in order (docs/architecture.md). "shared" are the top-level helpers every stage may use.
STAGES = ("shared", "config", "stream", "augment", "learner", "store", "service", "tools", "cli")
SHARED = {"__init__", "atomic", "devices", "distributed", "errors", "urls", "redis_client"}
DOC_FOLDERS = tuple(ROOT / d for d in ("docs", "benchmarks", "ops", "pipelines", "tests"))
IMPORT = re.compile(r"^\s*(?:from|import)\s+(streamssl(?:\.\w+)*)", re.M)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in SHARED:
        return "shared"
    return parts[1]


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def test_every_module_belongs_to_a_stage() -> None:
    unplaced = {m for m in modules() if stage_of(m) not in STAGES and m != "streamssl.__main__"}
    assert not unplaced, f"modules outside the stages of docs/architecture.md: {sorted(unplaced)}"


def test_imports_flow_forward() -> None:
    backward = []
    for module, path in modules().items():
        if module == "streamssl.__main__":  # the entry point runs the CLI
            continue
        mine = STAGES.index(stage_of(module))
        for imported in IMPORT.findall(path.read_text()):
            theirs = stage_of(imported)
            if theirs in STAGES and STAGES.index(theirs) > mine:
                backward.append(f"{module} ({stage_of(module)}) imports {imported} ({theirs})")
    assert not backward, "\n".join(backward)


def test_the_wheel_lists_every_package() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_docstrings_point_only_at_files_in_the_repository() -> None:
    missing = []
    for module, path in modules().items():
        for name in re.findall(r"\b([A-Za-z_]+\.md)\b", path.read_text()):
            in_docs = any(p.name == name for folder in DOC_FOLDERS for p in folder.glob("**/*.md"))
            if not (in_docs or (ROOT / name).is_file()):
                missing.append(f"{module}: {name}")
    assert not missing, missing
