"""The package's shape, measured from its imports (docs/architecture.md): layers point one way, no import circles,
no module past ~350 lines, and nothing at runtime imports the test support."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "boft_plugin"

# Lower layers never import higher ones (imports inside functions count too).
LAYERS = {
    "errors": 0,
    "ops": 0,
    "runtime": 0,
    "tuner": 1,
    "toy": 1,
    "distributed": 2,
    "stock_peft": 3,
    "export": 3,
    "recipes": 4,
    "demo": 5,
    "cli": 5,
    "__main__": 5,
    "__init__": 5,
    "testing": 6,
}
# Inside recipes/: the order a recipe is resolved in (keys, data and files; its sources; its checks; the plan; the
# builder and the trainers; the run). A module imports only modules of a lower rank.
RECIPE_LAYERS = {
    "args": 0,
    "checkpoints": 0,
    "data": 0,
    "data_order": 0,
    "deepspeed_precision": 0,
    "dpo_reference": 0,
    "engine_choice": 0,
    "generation": 0,
    "hub": 0,
    "output_guard": 0,
    "outputs": 0,
    "quantisation": 0,
    "vllm_sync": 0,
    "parsing": 1,
    "model_source": 1,
    "rewards": 1,
    "geometry_check": 2,
    "plan": 3,
    "builder": 4,
    "callbacks": 1,
    "trainers": 4,
    "train": 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                if module.startswith("boft_plugin"):
                    for alias in node.names:  # `from . import x` may name a submodule
                        candidate = f"{module}.{alias.name}"
                        targets.add(candidate if _exists(candidate) else module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("boft_plugin")}
        graph[name] = {t for t in targets if t != name}
    return graph


def _exists(module: str) -> bool:
    relative = Path(*module.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, targets in graph.items():
        for target in targets:
            if target == "boft_plugin" and importer.count(".") >= 1:
                target_layer = LAYERS["__init__"]
            else:
                target_layer = LAYERS[_top(target)]
            if target_layer > LAYERS[_top(importer)]:
                bad.append(f"{importer} -> {target}")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # a package importing its own submodule (re-exports) is not a circle
    return [c for c in found if not all(a.startswith(c[0]) or c[0].startswith(a) for a in c)]


def test_every_module_has_a_layer_and_every_layer_entry_exists():
    graph = import_graph()
    assert {_top(name) for name in graph} <= set(LAYERS)
    assert {key for key in LAYERS if key != "__init__" and not _exists(f"boft_plugin.{key}")} == set()  # no stale entry
    recipes = {_recipe_top(name) for name in graph if name.startswith("boft_plugin.recipes.")}
    assert recipes == set(RECIPE_LAYERS)  # every recipes module ranked, no stale rank


def _recipe_top(module: str) -> str:
    return module.split(".")[2]


def recipe_order_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, targets in graph.items():
        if not importer.startswith("boft_plugin.recipes."):
            continue
        for target in targets:
            inside = target.startswith("boft_plugin.recipes.") and _recipe_top(target) != _recipe_top(importer)
            if inside and RECIPE_LAYERS[_recipe_top(target)] >= RECIPE_LAYERS[_recipe_top(importer)]:
                bad.append(f"{importer} -> {target}")
    return sorted(bad)


def test_recipes_modules_import_downwards_only():
    assert recipe_order_violations(import_graph()) == []


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_imports_follow_the_layers():
    assert layering_violations(import_graph()) == []


def test_runtime_never_imports_the_test_support():
    graph = import_graph()
    offenders = [f"{a} -> {t}" for a, ts in graph.items() if _top(a) != "testing" for t in ts if _top(t) == "testing"]
    assert offenders == []


def test_the_checker_sees_a_violation():
    graph = {"boft_plugin.ops.butterfly": {"boft_plugin.tuner.layer"}, "boft_plugin.tuner.layer": set()}
    assert layering_violations(graph) == ["boft_plugin.ops.butterfly -> boft_plugin.tuner.layer"]
    circle = {"boft_plugin.a.x": {"boft_plugin.b.y"}, "boft_plugin.b.y": {"boft_plugin.a.x"}}
    assert cycles(circle)
    upward = {"boft_plugin.recipes.plan": {"boft_plugin.recipes.trainers"}}
    assert recipe_order_violations(upward) == ["boft_plugin.recipes.plan -> boft_plugin.recipes.trainers"]
