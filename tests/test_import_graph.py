"""The import graph of ppmoe/ and patchtrain/ stays clean. Three rules, checked on the source with `ast`
(nothing is imported, so the test is fast and needs none of the optional dependencies):

1. No function-local imports of project modules. An import of ppmoe/patchtrain inside a function hides a
   dependency from the top of the file and is almost always there to dodge an import cycle; the fix is
   to move the code both sides share down into a module that both import. Third-party imports inside
   functions are fine: that is how optional heavy dependencies (wandb, datasets, triton) stay optional.
2. No cycles between modules (files). A cycle makes the import order matter and leaves half-initialised
   modules around; a function-local import still counts as an edge, because it only delays the cycle.
3. No cycles between packages (ppmoe.model, ppmoe.moe, ..., ppmoe.errors, patchtrain.kernels, ...: the
   first two parts of the dotted name). Packages are layers: an acyclic package graph means no package
   imports one above it, so each can be read, tested and replaced with only what lies below it.

How imports are read: `import a.b` imports module a.b; `from a import b` imports a.b when b is a module,
else a (its __init__.py); relative imports are resolved against the importing file's package. Importing a
submodule is not counted as importing its parent package's __init__.py (Python runs it first, but a
package importing its own submodules is the normal shape, not a cycle). Imports under a module-level
`if TYPE_CHECKING:` never run, so they are no edges.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("ppmoe", "patchtrain")
MOVE_IT = "move it to the top; if it dodges an import cycle, move the shared code down"


@dataclass(frozen=True)
class Import:
    """One project module imported by one import statement."""
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    file: str  # the importing file, relative to the repository root
    line: int
    in_function: bool

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@functools.cache
def project_modules() -> dict[str, str]:
    """Dotted module name -> file path relative to the root, for every .py file of the project."""
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = str(path.relative_to(ROOT))
    return modules


def closest_module(name: str) -> str | None:
    """`name` itself or its longest dotted prefix that is a project module; None for third-party names."""
    while name and name not in project_modules():
        name = name.rpartition(".")[0]
    return name or None


def imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> set[str]:
    """The project modules that one import statement in `module` imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importing file's package, one level up per extra dot
            is_package = project_modules()[module].endswith("__init__.py")
            package = module if is_package else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}".rstrip(".")
        # `from base import name` imports the submodule base.name when there is one, else base itself
        names = [f"{base}.{alias.name}" for alias in node.names]
    return {target for target in map(closest_module, names) if target}


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_in(module: str, file: str, source: str) -> list[Import]:
    """The imports of project modules in one file's source, noting which run inside a function."""
    found = []

    def visit(nodes, in_function):
        for node in nodes:
            if isinstance(node, ast.If) and is_type_checking(node.test) and not in_function:
                visit(node.orelse, in_function)  # the body is for annotations only and never runs
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.extend(Import(module, target, file, node.lineno, in_function)
                             for target in sorted(imported_modules(node, module)))
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(ast.iter_child_nodes(node), inner)

    visit(ast.parse(source, filename=file).body, False)
    return found


@functools.cache
def project_imports() -> tuple[Import, ...]:
    """Every import of a project module by a project module."""
    return tuple(imp for module, file in project_modules().items()
                 for imp in imports_in(module, file, (ROOT / file).read_text()))


def import_graph(node_of) -> dict[str, dict[str, list[Import]]]:
    """node -> imported node -> the imports that make that edge; node_of maps a dotted module to its node."""
    graph = defaultdict(lambda: defaultdict(list))
    for imp in project_imports():
        source, target = node_of(imp.source), node_of(imp.target)
        if source != target:
            graph[source][target].append(imp)
    return graph


def find_cycles(graph) -> list[list[str]]:
    """One cycle [a, b, ..., a] per back edge of a depth-first search: empty exactly when the graph is acyclic."""
    cycles, on_path, done = [], [], set()

    def visit(node):
        on_path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                cycles.append(on_path[on_path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        on_path.pop()
        done.add(node)

    for node in sorted(graph):
        if node not in done:
            visit(node)
    return cycles


def describe_cycles(kind: str, graph) -> str:
    """Each cycle as its arrows, each arrow with the file:line of the imports that draw it."""
    text = []
    for cycle in find_cycles(graph):
        text.append(f"import cycle between {kind}: " + " -> ".join(cycle))
        for source, target in zip(cycle, cycle[1:]):
            sites = ", ".join(imp.where + (" (in a function)" if imp.in_function else "")
                              for imp in graph[source][target])
            text.append(f"  {source} -> {target}: {sites}")
    return "\n".join(text)


def package_of(module: str) -> str:
    """The package-level node: ppmoe.model.gpt -> ppmoe.model, ppmoe.errors -> ppmoe.errors."""
    return ".".join(module.split(".")[:2])


# The one exception, named: the command line imports the modules that pull in torch (~3 s) or matplotlib
# only inside the commands that need them (train, prepare, export, import, generate, plot), so a refused
# config, `ppmoe config` and `ppmoe slurm` answer in 0.1 s. Nothing imports the command line, so these can
# hide no cycle.
DEFERRED_FOR_START_UP = {("ppmoe.cli", target) for target in (
    "ppmoe.data", "ppmoe.parallel", "ppmoe.train", "ppmoe.interop.checkpoint_source", "ppmoe.interop.export",
    "ppmoe.interop.import_hf", "ppmoe.inference.generate", "ppmoe.inference.from_checkpoint", "ppmoe.report")}


def test_no_function_local_imports_of_project_modules():
    local = [imp for imp in project_imports()
             if imp.in_function and (imp.source, imp.target) not in DEFERRED_FOR_START_UP]
    if local:
        pytest.fail("imports of project modules inside functions (" + MOVE_IT + "):\n" + "\n".join(
            f"  {imp.where} imports {imp.target}" for imp in local), pytrace=False)


def test_no_import_cycles_between_modules():
    cycles = describe_cycles("modules", import_graph(lambda module: project_modules()[module]))
    if cycles:
        pytest.fail(cycles + "\nbreak it: move the code an import needs down, into a module below the cycle",
                    pytrace=False)


def test_no_import_cycles_between_packages():
    cycles = describe_cycles("packages", import_graph(package_of))
    if cycles:
        pytest.fail(cycles + "\nan arrow goes up a layer: move the code it needs down, below both packages",
                    pytrace=False)


# Read as if it were patchtrain/kernels/triton_patch_ce.py: one import of each shape the rules must resolve.
SAMPLE = """
from typing import TYPE_CHECKING
import torch
from .. import loss, patch_cross_entropy
from ..reference_loss import expanded_cross_entropy
import ppmoe.model.gpt
if TYPE_CHECKING:
    from ppmoe.moe.layer import MoEFeedForward
def build():
    import wandb
    from ppmoe.errors import PpmoeError
class Kernel:
    def forward(self):
        from ..data import to_patch_batch
"""


def test_imports_are_read_as_python_runs_them():
    """The rules pass vacuously if imports are misread: check each shape on a sample (line, module, in function)."""
    module = "patchtrain.kernels.triton_patch_ce"
    found = {(imp.line, imp.target, imp.in_function) for imp in imports_in(module, "sample.py", SAMPLE)}
    assert found == {
        (4, "patchtrain.loss", False),  # `from package import submodule` imports the submodule
        (4, "patchtrain", False),  # `from package import name` imports the package's __init__.py
        (5, "patchtrain.reference_loss", False),  # two dots: up from patchtrain.kernels to patchtrain
        (6, "ppmoe.model.gpt", False),
        # line 8 is under TYPE_CHECKING and line 10 is third-party: neither is an edge
        (11, "ppmoe.errors", True),
        (14, "patchtrain.data", True),  # a method is a function too
    }
