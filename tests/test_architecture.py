"""The layout keeps its shape: every import runs down the layer order of docs/architecture.md, no two
packages import each other (directly or round a circle), and function-level imports are kept for
optional or heavy third-party dependencies, each with its reason on the line.

Each package (`isolocal`, each of its subpackages, `analysis`) is one node; a module belongs to the
deepest package that holds it. Imports are read from the source: top-level and inside functions,
absolute and relative, and module names handed to `importlib.import_module` as string constants;
imports under `if TYPE_CHECKING:` only serve type checkers and are left out.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("isolocal", "analysis")

# Top to bottom; a package may import only packages on lower rows (and itself).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("isolocal",),  # the public facade (isolocal/__init__.py) and `python -m isolocal`
    ("isolocal.cli", "isolocal.testing"),
    ("isolocal.cluster",),
    ("isolocal.study",),
    ("isolocal.train.pipeline",),
    ("isolocal.train",),
    ("analysis",),
    ("isolocal.eval",),
    ("isolocal.io", "isolocal.data"),
    ("isolocal.models",),
    ("isolocal.heads",),
    ("isolocal.core",),
    ("isolocal.config",),
    ("isolocal.errors",),
)
LAYER = {package: row for row, packages in enumerate(LAYERS) for package in packages}

# The command line: it defers the library to the command that runs.
COMMANDS = ("isolocal.cli",)
# Project packages that import DeepSpeed: a command that may run without it imports them inside the function
# that needs them.
NEEDS_DEEPSPEED = ("isolocal.train.pipeline",)
# Third-party modules that may be imported inside a function (optional, or heavy and off the hot path).
DEFERRABLE = ("deepspeed", "torch.utils.tensorboard", "tensorboard", "matplotlib", "pandas", "safetensors",
              "skimage", "tomli_w")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted (absolute)
    line: int
    in_function: bool
    reason: str  # the comment on the import's line or the line above it ("" if none)


def module_files() -> dict[str, Path]:
    files = {}
    for root in ROOTS:
        for path in (REPO / root).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def package_of(module: str, packages: set[str]) -> str:
    """The deepest package holding `module` (a package is its own); `isolocal.errors` is a node of its own."""
    if module in LAYER:
        return module
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in packages:
            return name
    raise AssertionError(f"{module} is in no package")


def _comment(lines: list[str], line: int) -> str:
    for text in (lines[line - 1], lines[line - 2] if line >= 2 else ""):
        if "#" in text:
            return text.split("#", 1)[1].strip()
    return ""


def imports_of(module: str, path: Path) -> Iterator[Import]:
    source = path.read_text()
    lines = source.splitlines()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]

    def walk(node: ast.AST, in_function: bool) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package[:len(package) - child.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names] + [base]
            elif (isinstance(child, ast.Call) and ast.unparse(child.func).endswith("import_module")
                  and child.args and isinstance(child.args[0], ast.Constant)):
                targets = [child.args[0].value]
            for target in targets:
                yield Import(module, target, child.lineno, in_function, _comment(lines, child.lineno))
            yield from walk(child, inner)

    yield from walk(ast.parse(source), False)


def project_imports() -> list[Import]:
    """Every import of a project module by a project module, resolved to an existing module name."""
    files = module_files()
    found = []
    for module, path in files.items():
        for imp in imports_of(module, path):
            if imp.target.split(".")[0] in ROOTS and imp.target in files:
                found.append(imp)
    return found


def package_graph(imports: list[Import]) -> dict[str, set[str]]:
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for imp in imports:
        a, b = package_of(imp.module, packages), package_of(imp.target, packages)
        graph.setdefault(a, set())
        graph.setdefault(b, set())
        if a != b:
            graph[a].add(b)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(imports: list[Import]) -> list[str]:
    """Imports against the layer order, as 'module:line imports target (row a -> row b)'."""
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"}
    bad = []
    for imp in imports:
        a, b = package_of(imp.module, packages), package_of(imp.target, packages)
        if a != b and LAYER[a] >= LAYER[b]:
            bad.append(f"{imp.module}:{imp.line} imports {imp.target} ({a} is not above {b})")
    return bad


def test_every_package_has_a_layer():
    packages = {m for m, p in module_files().items() if p.name == "__init__.py"} | {"isolocal.errors"}
    assert sorted(packages - set(LAYER)) == []
    assert sorted(set(LAYER) - packages) == []


def test_every_import_runs_down_the_layer_order():
    assert upward(project_imports()) == []


def test_no_two_packages_import_each_other():
    assert cycles(package_graph(project_imports())) == []


def deferred_on_purpose(imp: Import) -> bool:
    """A command module importing the library inside the command (so `--help` and config errors run
    without torch), or anyone outside it importing the DeepSpeed-importing pipeline package; with the
    reason on the line."""
    command = imp.module.startswith(COMMANDS)
    pipeline = imp.target.startswith(NEEDS_DEEPSPEED) and not imp.module.startswith(NEEDS_DEEPSPEED)
    return bool(imp.reason) and (command or pipeline)


def test_project_modules_are_imported_at_the_top_of_the_module():
    lazy = [f"{i.module}:{i.line} imports {i.target}" for i in project_imports()
            if i.in_function and not deferred_on_purpose(i)]
    assert lazy == []


def test_function_level_imports_are_optional_dependencies_with_a_reason():
    files = module_files()
    bad = []
    for module, path in files.items():
        for imp in imports_of(module, path):
            if not imp.in_function or imp.target.split(".")[0] in ROOTS:
                continue
            if not imp.target.startswith(DEFERRABLE) or not imp.reason:
                bad.append(f"{module}:{imp.line} imports {imp.target} in a function"
                           f"{'' if imp.reason else ' with no reason comment'}")
    assert sorted(set(bad)) == []


@pytest.mark.parametrize("edge", [("isolocal.models", "isolocal.train"), ("isolocal.core", "isolocal.heads")])
def test_the_checks_catch_an_upward_import_and_a_circle(edge):
    """The checker sees what it must catch: one upward edge, and the circle it closes."""
    importer, target = edge
    imports = project_imports() + [Import(f"{importer}.x", f"{target}", 1, False, "")]
    assert upward(imports)
    graph = package_graph(imports)
    graph.setdefault(importer, set()).add(target)
    graph.setdefault(target, set()).add(importer)
    assert any(importer in c and target in c for c in cycles(graph))


@pytest.mark.parametrize("facade", ["isolocal", "analysis"])
def test_the_lazy_facades_export_exactly_their_table(facade):
    """`__all__` lists every name the facade imports on first use, and each resolves."""
    module = __import__(facade)
    assert module.__all__ == sorted(module._EXPORTS)
    assert all(getattr(module, name) is not None for name in module.__all__)
