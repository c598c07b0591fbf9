"""The walls of the house, read from the source (ast, no tool to install):

- `luna/` is the ground floor: it imports no stage;
- a stage imports another stage only through the file-contract modules of DESIGN.md §2 listed in
  CONTRACTS (the roof, `demo/`, may import every stage);
- no import circle between modules (imports inside functions count: they are still a circle);
- every module imports.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROUND = "luna"
ROOF = "demo"
STAGES = ("factory", "extraction", "vault", "projector", "lsd_runtime", "comfyui")
# module -> why another stage may import it (the one reader/writer of a contract shared by stages)
CONTRACTS = {
    "factory.shards": "shard tars: the one reader/writer (extraction, contact sheets, the demo)",
    "extraction.pairs": "pairs HDF5: the one reader/writer (vault build, projector data)",
    "vault.service": "a vault folder or service, opened for queries (runtime, ComfyUI node)",
    "vault.blend": "how a vault answer's neighbours blend into one conditioning (runtime, ComfyUI node)",
    "projector.export": "an exported projector folder, loaded (runtime, ComfyUI node)",
    "lsd_runtime.api": "the runtime's pure parts and denoiser interface (the ComfyUI nodes)",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in (GROUND, ROOF, *STAGES):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (at the top or inside a function), relative imports resolved."""
    out = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in MODULES)
    return out


GRAPH = {name: {t for t in _imports(name, path) if t.split(".")[0] in (GROUND, ROOF, *STAGES)}
         for name, path in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


def test_the_ground_floor_imports_no_stage():
    wrong = [f"{m} imports {t}" for m, targets in GRAPH.items() if _top(m) == GROUND
             for t in sorted(targets) if _top(t) != GROUND]
    assert not wrong, "luna/ is shared by every stage and must not import one:\n" + "\n".join(wrong)


def test_stages_meet_only_through_file_contracts():
    wrong = []
    for module, targets in GRAPH.items():
        if _top(module) in (GROUND, ROOF):
            continue
        for target in sorted(targets):
            if _top(target) in (GROUND, _top(module)):
                continue
            if _top(target) == ROOF:
                wrong.append(f"{module} imports the demo {target}")
            elif target not in CONTRACTS and _top(target) != target:
                wrong.append(f"{module} imports {target} (not a contract module: {sorted(CONTRACTS)})")
            elif _top(target) == target:
                wrong.append(f"{module} imports the whole package {target}")
    assert not wrong, "\n".join(wrong)


def test_the_contract_modules_exist_and_do_not_lead_back():
    """A contract module imports nothing of the stage that uses it: stages depend on it one way."""
    assert set(CONTRACTS) <= set(MODULES)
    packages = {}
    for module, targets in GRAPH.items():
        for target in targets:
            if _top(target) != _top(module) and _top(module) not in (GROUND, ROOF):
                packages.setdefault(_top(module), set()).add(_top(target))
    both_ways = sorted({tuple(sorted((a, b))) for a, bs in packages.items() for b in bs
                        if a in packages.get(b, set()) and GROUND not in (a, b)})
    assert not both_ways, f"stages that import each other: {both_ways}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root] & graph.keys())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child] & graph.keys()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
    graph = {m: {t for t in targets if t in MODULES and t != m} for m, targets in GRAPH.items()}
    assert _cycles(graph) == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _top(m) != "comfyui"))
def test_every_module_imports(module):
    importlib.import_module(module)


def test_the_comfyui_nodes_import_as_a_custom_node_folder():
    spec = importlib.util.spec_from_file_location("luna_comfyui_nodes", ROOT / "comfyui" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "comfyui")])
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    try:
        spec.loader.exec_module(package)
        assert package.NODE_CLASS_MAPPINGS
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]
