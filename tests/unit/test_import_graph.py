"""No import cycle inside the package: a test that walks every module's imports (top-level and
function-level alike: a lazy import only hides a cycle until the function runs) and fails on a
cycle, naming its modules. Importing a.b.c also runs a.b's __init__, so a cross-package import
adds an edge to the imported package too (not to the importer's own ancestors, which Python has
already started)."""
import ast
import os
from typing import Dict, List, Set

import megatron_rl

PACKAGE_DIR = os.path.dirname(megatron_rl.__file__)


def module_files() -> Dict[str, str]:
    modules = {}
    for root, dirs, files in os.walk(PACKAGE_DIR):
        dirs[:] = [d for d in dirs if d != "__pycache__" and d != "sglang_cpu"]
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))
                parts = rel[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                modules[".".join(parts)] = os.path.join(root, name)
    return modules


def import_graph() -> Dict[str, Set[str]]:
    modules = module_files()
    graph: Dict[str, Set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        is_package = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets: List[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = module.split(".")
                    base = base[:len(base) - node.level + (1 if is_package else 0)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                targets.append(name)
                # `from pkg import sub` imports the submodule pkg.sub
                targets += [f"{name}.{alias.name}" for alias in node.names
                            if f"{name}.{alias.name}" in modules]
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        for target in targets:
            if target not in modules:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the target and the packages above it
                name = ".".join(parts[:i])
                if name in modules and name != module and (name == target
                                                           or name not in ancestors):
                    graph[module].add(name)
    return graph


def find_cycle(graph: Dict[str, Set[str]]):
    """One cycle as a list of modules, or None (iterative DFS, white/grey/black)."""
    colour = {m: 0 for m in graph}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        colour[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_graph_sees_function_level_and_package_edges():
    graph = import_graph()
    # train.py imports megatron_rl.config at function level; config imports parallel.config
    assert "megatron_rl.parallel.config" in graph["megatron_rl.config"]
    assert "megatron_rl.parallel" in graph["megatron_rl.config"]
