"""The layering common < client, server < simulations < confide holds, import by import.

Every import statement of every module counts, including those inside functions and under
`if TYPE_CHECKING:`: a lazy import is still a dependency, and a cycle hidden in a function is
still a cycle. client and server never import each other (they meet only through Flower), the
ServerApp never imports the coordinator's operations tooling (server/coordinator/), and the
coordinator, being deployment, never imports the simulator.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"common": 0, "client": 1, "server": 1, "simulations": 2, "confide": 3}
OPERATIONS = "server.coordinator"  # the coordinator's tooling, beside the ServerApp


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # file:line, for the failure message


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def project_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in LAYER
        for path in sorted((ROOT / package).rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def resolve(name: str) -> str | None:
    """The project module `name` refers to (a module, or an attribute of one), else None."""
    modules = project_modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, path: Path) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importer's package upwards
        package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, *([base] if base else [])])
    # `from package import module` imports that module; `from module import name` the module.
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


@cache
def project_imports() -> tuple[Import, ...]:
    found = set()
    for importer, path in project_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(node, importer, path):
                imported = resolve(name)
                if imported is not None and imported != importer:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.add(Import(importer, imported, where))
    return tuple(sorted(found, key=lambda i: (i.importer, i.imported, i.where)))


def layer_of(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_every_kind_of_import() -> None:
    """Guards the checks below against passing vacuously."""
    edges = {(i.importer, i.imported) for i in project_imports()}
    assert ("common.site_data", "common.schema") in edges  # module level
    assert ("confide.deploy_cli", "client.join") in edges  # inside a function
    assert ("server.coordinator.coordinator", "server.coordinator.flwr_control") in edges  # from
    entry_points = {
        "common.models",
        "client.app",
        "server.app",
        "simulations.engine",
        "confide.cli",
    }
    assert entry_points <= set(project_modules())


def test_no_import_goes_up_a_layer_or_across_client_and_server() -> None:
    wrong = [
        f"{i.where}: {i.importer} imports {i.imported}"
        for i in project_imports()
        if LAYER[layer_of(i.imported)] > LAYER[layer_of(i.importer)]
        or (
            LAYER[layer_of(i.imported)] == LAYER[layer_of(i.importer)]
            and layer_of(i.imported) != layer_of(i.importer)
        )
    ]
    assert not wrong, "imports against common < client, server < simulations < confide:\n" + (
        "\n".join(wrong)
    )


def test_the_server_app_does_not_import_the_coordinators_operations_tooling() -> None:
    def operations(module: str) -> bool:
        return module == OPERATIONS or module.startswith(f"{OPERATIONS}.")

    wrong = [
        f"{i.where}: {i.importer} imports {i.imported}"
        for i in project_imports()
        if layer_of(i.importer) == "server"
        and not operations(i.importer)
        and operations(i.imported)
    ]
    assert not wrong, "the ServerApp reaches into server/coordinator/:\n" + "\n".join(wrong)


def test_the_project_import_graph_has_no_cycles() -> None:
    graph: dict[str, set[str]] = {module: set() for module in project_modules()}
    for i in project_imports():
        graph[i.importer].add(i.imported)
    cycles = [sorted(component) for component in strongly_connected(graph) if len(component) > 1]
    assert not cycles, "import cycles (each line one set of modules importing each other):\n" + (
        "\n".join(" <-> ".join(cycle) for cycle in cycles)
    )


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a deep import chain)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            successor = next(successors, None)
            if successor is not None:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                elif successor in on_stack:
                    low[node] = min(low[node], index[successor])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert sorted(map(sorted, strongly_connected(graph))) == [["a", "b", "c"], ["d"]]
