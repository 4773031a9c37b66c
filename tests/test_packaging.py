"""The package declares what it imports, and requirements.lock pins what it declares.

A module imported but not declared works here only because something else pulled it in (flwr
brings `tomli_w`); a fresh install of Confide alone would fail at import. Each import is mapped to
its distribution with `importlib.metadata.packages_distributions()`, so `grpc` is `grpcio`.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from common.run_config import PROJECT_ROOT

PACKAGE = ("common", "client", "server", "simulations", "confide")  # what the wheel ships
TOOLING = ("bench", "tests")  # may also use the optional extras (dev)
OPTIONAL = {"transformers": "hf"}  # the package may import these lazily, from their extra
LOCK_FILE = PROJECT_ROOT / "requirements.lock"


def manifest() -> dict:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)


def requirements(include_extras: bool) -> list[Requirement]:
    project = manifest()["project"]
    lines = list(project["dependencies"])
    if include_extras:
        lines += [line for extra in project["optional-dependencies"].values() for line in extra]
    return [Requirement(line) for line in lines]


def python_files(folders: Iterable[str]) -> list[Path]:
    return sorted(path for folder in folders for path in (PROJECT_ROOT / folder).rglob("*.py"))


def first_party() -> set[str]:
    """Top-level names that resolve inside this repository: its folders, and the packages in
    them (bench's baseline app imports its own `bankbaseline`)."""
    inits = python_files(PACKAGE + TOOLING)
    return {*PACKAGE, *TOOLING} | {p.parent.name for p in inits if p.name == "__init__.py"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every absolute import, lazy ones inside functions included."""
    return imported_modules_of(ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))))


def imported_modules_of(nodes: Iterable[ast.AST]) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def eager_imports(path: Path) -> set[str]:
    """Top-level names imported when the module loads: not inside functions, nor in
    `if TYPE_CHECKING:` blocks."""
    loads = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            return
        loads.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return imported_modules_of(loads)


def undeclared_imports(folders: Iterable[str], include_extras: bool) -> list[str]:
    declared = {canonicalize_name(r.name) for r in requirements(include_extras)}
    declared |= {canonicalize_name(module) for module in OPTIONAL}  # checked by eagerly_optional
    distributions = importlib.metadata.packages_distributions()
    local = first_party()
    problems = []
    for path in python_files(folders):
        for module in sorted(imported_modules(path) - local - set(sys.stdlib_module_names)):
            candidates = {canonicalize_name(d) for d in distributions.get(module, [])}
            if not candidates & declared:
                where = "[project] dependencies" + (" or extras" if include_extras else "")
                names = ", ".join(sorted(candidates)) or "no installed distribution"
                problems.append(
                    f"{path.relative_to(PROJECT_ROOT)} imports {module} ({names}): "
                    f"not in pyproject.toml {where}; declare it"
                )
    return problems


def locked_versions() -> dict[str, str]:
    pins = {}
    for line in LOCK_FILE.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_third_party_module_the_package_imports_is_a_declared_dependency() -> None:
    assert undeclared_imports(PACKAGE, include_extras=False) == []


def test_optional_modules_are_imported_lazily_and_declared_by_their_extra() -> None:
    """A site without the extra imports every module; only a run that needs it asks for it."""
    extras = manifest()["project"]["optional-dependencies"]
    for module, extra in OPTIONAL.items():
        assert any(canonicalize_name(Requirement(line).name) == module for line in extras[extra])
    eager = [
        f"{path.relative_to(PROJECT_ROOT)} imports {module} when it loads"
        for path in python_files(PACKAGE)
        for module in eager_imports(path) & set(OPTIONAL)
    ]
    assert eager == []


def test_every_third_party_module_bench_and_tests_import_is_declared_or_in_an_extra() -> None:
    assert undeclared_imports(TOOLING, include_extras=True) == []


def test_the_import_walk_sees_lazy_imports_and_skips_relative_ones(tmp_path: Path) -> None:
    module = tmp_path / "launcher.py"
    module.write_text("from . import sibling\n\ndef run():\n    import uvicorn.config\n")
    assert imported_modules(module) == {"uvicorn"}
    assert eager_imports(module) == set()
    module.write_text(
        "if TYPE_CHECKING:\n    import torch\ntry:\n    import transformers\nexcept ImportError:\n    pass\n"
    )
    assert eager_imports(module) == {"transformers"}


@pytest.mark.parametrize("requirement", requirements(include_extras=True), ids=str)
def test_the_lock_pins_every_declared_dependency_within_its_bounds(
    requirement: Requirement,
) -> None:
    pins = locked_versions()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{LOCK_FILE.name} has no {name}: run make lock"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"{LOCK_FILE.name} pins {name}=={pins[name]}, outside pyproject's {requirement}: "
        "run make lock"
    )


BENCH_SCRIPTS = sorted(
    path.stem
    for path in (PROJECT_ROOT / "bench").glob("*.py")
    if 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")
)
# Runs each `python -m bench.NAME ARGUMENT` in one process (imports are shared, so this is quick)
# and prints {name: exit code}; "ran" when a script did not stop at its arguments.
ENTRY_POINTS = """
import contextlib, io, json, runpy, sys
argument, names, codes = sys.argv[1], sys.argv[2:], {}
for name in names:
    sys.argv = [f"bench/{name}.py", argument]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            runpy.run_module(f"bench.{name}", run_name="__main__")
            codes[name] = "ran"
        except SystemExit as stop:
            codes[name] = stop.code if isinstance(stop.code, int) else 1
print(json.dumps(codes))
"""


def bench_exit_codes(argument: str) -> dict[str, object]:
    results = PROJECT_ROOT / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    result = subprocess.run(
        [sys.executable, "-c", ENTRY_POINTS, argument, *BENCH_SCRIPTS],
        capture_output=True,
        text=True,
        timeout=300,  # a script that ignores its arguments would run for hours
        cwd=PROJECT_ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_bench_script_prints_usage_for_help_and_runs_nothing() -> None:
    assert "run_all" in BENCH_SCRIPTS and "privacy" in BENCH_SCRIPTS
    assert bench_exit_codes("--help") == dict.fromkeys(BENCH_SCRIPTS, 0)


def test_every_bench_script_refuses_an_unknown_argument_and_runs_nothing() -> None:
    assert bench_exit_codes("--no-such-option") == dict.fromkeys(BENCH_SCRIPTS, 2)
