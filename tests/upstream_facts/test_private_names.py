"""Every private upstream name boft-plugin relies on still exists in the pinned versions, and no module outside
boft_plugin.runtime.upstream imports one by itself (so an upgrade that breaks one fails here, by name)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from boft_plugin.runtime import upstream

PACKAGE = Path(upstream.__file__).resolve().parents[1]
UPSTREAM = (
    "peft",
    "transformers",
    "trl",
    "accelerate",
    "deepspeed",
    "torch",
    "huggingface_hub",
    "safetensors",
    "bitsandbytes",
)


@pytest.mark.parametrize("name", upstream.IMPORTED + upstream.OVERRIDDEN, ids=lambda n: f"{n.module}:{n.qualname}")
def test_the_pinned_libraries_still_have_it(name):
    upstream.resolve(name)  # raises ImportError / AttributeError when the pinned library lost it


def private_imports(path: Path, root: Path = PACKAGE) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in UPSTREAM:
            hidden_module = any(part.startswith("_") for part in node.module.split("."))
            for alias in node.names:
                if hidden_module or alias.name.startswith("_"):
                    found.append(f"{path.relative_to(root)}: from {node.module} import {alias.name}")
    return found


def test_only_the_upstream_module_imports_private_names():
    offenders = [
        line
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != Path(upstream.__file__).resolve()
        for line in private_imports(path)
    ]
    assert offenders == []


def test_the_checker_sees_a_private_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from peft.tuners.tuners_utils import _maybe_include_all_linear_layers\n")
    assert private_imports(module, tmp_path) == [
        "m.py: from peft.tuners.tuners_utils import _maybe_include_all_linear_layers"
    ]
