"""Which modules a Python syntax tree imports: ours (``idc_diffusion...``) and third-party.

Shared by tests/test_envs.py (each rule's env holds what its command imports) and
tests/test_package_layout.py (stages import only the core and earlier stages).
"""

from __future__ import annotations

import ast
import sys


def own_imports(tree: ast.AST) -> tuple[set[str], set[str], set[str]]:
    """(idc_diffusion modules, third-party modules, optional third-party modules) imported
    in a tree; optional ones are guarded by `except ImportError` and reported apart."""
    optional = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    ours, theirs, maybe = set(), set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
            if node.module.startswith("idc_diffusion"):  # a name may be a module of the package
                names += [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("idc_diffusion"):
                ours.add(name)
            elif name.split(".")[0] not in sys.stdlib_module_names and name != "__future__":
                (maybe if id(node) in optional else theirs).add(name)
    return ours, theirs, maybe


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"} for n in names
    )
