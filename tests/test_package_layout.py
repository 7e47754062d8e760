"""The library mirrors the workflow: one subpackage per stage, imports run one way only.

A stage may import the shared core and the stages before it (their data contracts and
helpers), never a later stage; the core imports no stage. Every module lives in a stage or
the core (the CLI aside), every subpackage says in its docstring what it reads and writes
and names an entry module that exists, and no function or module grows past what one reader
holds in mind.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from import_graph import own_imports

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "idc_diffusion"
# The stages in workflow order; a module may import stages at or before its own.
STAGES = ("cohort", "download", "prepare", "train", "sample", "evaluate")
CORE = "core"
TOP_LEVEL = {"__init__", "__main__", "cli"}  # the CLI dispatches to every stage
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def rank(subpackage: str) -> int:
    """The position of a subpackage in the dependency order (core first)."""
    return -1 if subpackage == CORE else STAGES.index(subpackage)


def imported_subpackages(source: str) -> set[str]:
    """The ``idc_diffusion`` subpackages a module's source imports, at any depth."""
    ours = own_imports(ast.parse(source))[0]
    return {name.split(".")[1] for name in ours if "." in name}


def backward_imports(subpackage: str, source: str) -> list[str]:
    """The subpackages ``source`` (a module of ``subpackage``) may not import."""
    own = rank(subpackage)
    return sorted(
        other
        for other in imported_subpackages(source)
        if other in (CORE, *STAGES) and rank(other) > own
    )


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_checker_sees_a_later_stage_import() -> None:
    source = "def f():\n    from idc_diffusion.evaluate.metrics import kid\n"
    assert backward_imports("train", source) == ["evaluate"]
    assert backward_imports(CORE, "from idc_diffusion import train\n") == ["train"]
    assert backward_imports("evaluate", source) == []
    assert backward_imports("sample", "from idc_diffusion.train.models import x\n") == []


def test_every_module_lives_in_a_stage_or_the_core() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == {CORE, *STAGES}
    loose = {p.stem for p in PACKAGE.glob("*.py")} - TOP_LEVEL
    assert not loose, f"modules outside a stage subpackage: {sorted(loose)}"
    vague = [p for p in library_modules() if p.stem in {"utils", "misc", "helpers", "common"}]
    assert not vague


@pytest.mark.parametrize("module", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(module: Path) -> None:
    relative = module.relative_to(PACKAGE)
    if len(relative.parts) == 1:
        assert relative.stem in TOP_LEVEL
        return
    later = backward_imports(relative.parts[0], module.read_text())
    assert not later, f"{relative} imports a later stage: {later}"


@pytest.mark.parametrize("subpackage", (CORE, *STAGES))
def test_subpackage_docstring_names_what_it_does(subpackage: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / subpackage / "__init__.py").read_text()))
    assert doc, f"{subpackage}/__init__.py has no docstring"
    if subpackage == CORE:
        return
    assert "Reads" in doc and "Writes" in doc and "results/" in doc
    entries = re.findall(rf"idc_diffusion\.{subpackage}\.(\w+)\.(\w+)", doc)
    assert entries, f"{subpackage}/__init__.py names no entry point"
    for module, function in entries:
        tree = ast.parse((PACKAGE / subpackage / f"{module}.py").read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        assert function in defined, f"{subpackage}.{module} defines no {function}"


@pytest.mark.parametrize("module", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_functions_and_modules_stay_readable(module: Path) -> None:
    source = module.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{module.name}: over {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{module.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
