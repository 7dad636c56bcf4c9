"""The package layers form no cycle: no dspark subpackage (or top-level module) imports, directly or through
others, one that imports it back; imports inside functions count too (a lazy import is still a cycle)."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dspark", "deployments")
GENERATED = ROOT / "dspark" / "v1"


def unit(module: str) -> str | None:
    """The layer a module belongs to: `dspark.<first component>`, or `deployments`."""
    parts = module.split(".")
    if parts[0] == "dspark" and len(parts) > 1:
        return f"dspark.{parts[1]}"
    return "deployments" if parts[0] == "deployments" else None


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if GENERATED in path.parents:
                continue
            relative = path.relative_to(ROOT).with_suffix("")
            parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
            source = unit(".".join(parts))
            if source is None:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    target = unit(name)
                    if target is not None and target != source:
                        graph[source][target].append(str(relative))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle as a list of units (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_layers():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        edges = [f"{a} -> {b} ({', '.join(sorted(set(graph[a][b])))})" for a, b in itertools.pairwise(cycle)]
        raise AssertionError("import cycle:\n  " + "\n  ".join(edges))


def test_the_checker_finds_a_cycle():
    graph = {
        "dspark.a": {"dspark.b": ["a.py"]},
        "dspark.b": {"dspark.c": ["b.py"]},
        "dspark.c": {"dspark.a": ["c.py"]},
    }
    assert find_cycle(graph) == ["dspark.a", "dspark.b", "dspark.c", "dspark.a"]
    assert find_cycle({"dspark.a": {"dspark.b": ["a.py"]}}) is None


def test_engine_core_does_not_import_the_layers_above_it():
    """The engine, models, proposers and scheduling sit below assembly, training, serving and the CLI."""
    graph = import_graph()
    below = {"dspark.engine", "dspark.models", "dspark.proposers", "dspark.scheduling", "dspark.drafters"}
    above = {"dspark.assembly", "dspark.training", "dspark.serving", "dspark.cli", "deployments"}
    wrong = [(a, b) for a in below for b in graph.get(a, {}) if b in above]
    assert not wrong, wrong
