"""moe_ext.moe's public surface: what it exports, and that nothing outside it reaches into
its private modules (names starting with ``_``) or that it imports anything above it."""

from __future__ import annotations

import ast
from pathlib import Path

import moe_ext.moe as moe

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "moe_ext"


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by a Python file."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_exports_layer_router_experts_and_dispatchers():
    for name in (
        "MoELayer",
        "build_moe_layer",
        "TopKRouter",
        "GroupedExperts",
        "Dispatcher",
        "DispatchGroups",
        "build_dispatcher",
        "dispatcher_class",
        "DISPATCHERS",
    ):
        assert name in moe.__all__, name
    missing = [name for name in moe.__all__ if not hasattr(moe, name)]
    assert not missing, missing


def test_no_private_moe_module_is_imported_from_outside():
    offenders = []
    for path in (
        list(PACKAGE.rglob("*.py"))
        + list((ROOT / "tools").rglob("*.py"))
        + list((ROOT / "launch").rglob("*.py"))
    ):
        if PACKAGE / "moe" in path.parents:
            continue
        for module in _imports(path):
            parts = module.split(".")
            if parts[:2] == ["moe_ext", "moe"] and any(p.startswith("_") for p in parts):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, offenders


def test_moe_depends_on_nothing_above_it():
    above = []
    for path in (PACKAGE / "moe").rglob("*.py"):
        for module in _imports(path):
            if module.startswith("moe_ext") and not module.startswith(
                # the quantized formats are plain tensor facts the experts store
                ("moe_ext.moe", "moe_ext.errors", "moe_ext.quant.config", "moe_ext.quant.formats")
            ):
                above.append(f"{path.relative_to(ROOT)}: {module}")
    assert not above, above
