"""The package's import graph: no cycles between modules, no private names imported across modules.

Every ``import`` of the package's own modules counts, wherever it is: at module level, inside a function, under
``if TYPE_CHECKING:``. ``from concept_influence.x import y`` is an edge to the submodule ``x.y`` when ``y`` is one,
otherwise to ``x`` (a package's ``__init__`` when ``x`` is a package). A package ``__init__`` re-exports its
submodules, so a module importing a re-exported name from its own package's ``__init__`` (or an ancestor's) would
close a cycle through that re-export: that is reported on its own (import the defining module instead). A name the
``__init__`` defines itself (``cli.main`` for ``cli/__main__.py``) may be imported from it.

Imports of the package's own modules inside functions are listed in ``ImportGraph.function_imports``; they are
allowed only where they keep a heavy dependency off an import path (the CLI's commands, which keep ``--help``
fast; the test helpers in ``testing/``): ``test_function_imports_only_where_listed``.

The checker runs on the real package and, in the test of the test, on tiny fake packages built in ``tmp_path``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import concept_influence

PACKAGE_DIR = Path(concept_influence.__file__).resolve().parent


@dataclass
class ImportGraph:
    edges: dict[str, set[str]] = field(default_factory=dict)
    # (importing module, line, text) for each problem that is not a cycle
    private_imports: list[tuple[str, int, str]] = field(default_factory=list)
    own_package_imports: list[tuple[str, int, str]] = field(default_factory=list)
    function_imports: list[tuple[str, int, str]] = field(default_factory=list)


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``package_dir`` (``pkg/__init__.py`` is ``pkg``)."""
    package_dir = Path(package_dir)
    root = package_dir.name
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [root, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    """The absolute module name an ``ImportFrom`` reads from (None: outside the package or malformed)."""
    if node.level == 0:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level - 1 > len(base) - 1:
        return None
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _within(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` is inside a function (or lambda) body."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return True
    return False


def import_graph(package_dir: Path) -> ImportGraph:
    modules = module_names(package_dir)
    root = Path(package_dir).name
    graph = ImportGraph(edges={name: set() for name in modules})

    def target(name: str) -> str | None:
        """The longest existing module that ``name`` (a dotted path) names or lies inside."""
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in modules:
                return candidate
            parts.pop()
        return None

    def reexports(package: str) -> set[str]:
        """The names a package ``__init__`` binds by importing them (from its submodules or elsewhere)."""
        if modules[package].name != "__init__.py":
            return set()
        tree = ast.parse(modules[package].read_text(encoding="utf-8"))
        return {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }

    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(tree):
            found: list[str] = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        found.append(target(alias.name))
            elif isinstance(node, ast.ImportFrom):
                source = _resolve_from(module, is_package, node)
                if source is None or not (source == root or source.startswith(root + ".")):
                    continue
                for alias in node.names:
                    submodule = f"{source}.{alias.name}"
                    if submodule in modules:
                        found.append(submodule)
                        continue
                    imported_from = target(source)
                    found.append(imported_from)
                    text = f"from {source} import {alias.name}"
                    if _is_private(alias.name) and imported_from != module:
                        graph.private_imports.append((module, node.lineno, text))
                    if (
                        imported_from is not None
                        and module.startswith(imported_from + ".")
                        and alias.name in reexports(imported_from)
                    ):
                        graph.own_package_imports.append((module, node.lineno, text))
            else:
                continue
            for name in found:
                if name is not None and name != module:
                    graph.edges[module].add(name)
            if found and _within(node, parents):
                graph.function_imports.append((module, node.lineno, ast.unparse(node)))
    return graph


def strongly_connected_components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); every component, in the order they complete."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
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
                components.append(sorted(component))
    return components


def import_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (self-imports are not edges)."""
    return sorted(c for c in strongly_connected_components(edges) if len(c) > 1)


def problems(package_dir: Path) -> list[str]:
    """Everything the rules forbid, one line each (empty when the package is clean)."""
    graph = import_graph(package_dir)
    lines = []
    for component in import_cycles(graph.edges):
        inside = {a: sorted(b for b in graph.edges[a] if b in component) for a in component}
        lines.append("import cycle: " + "; ".join(f"{a} -> {', '.join(bs)}" for a, bs in inside.items()))
    for module, line, text in graph.private_imports:
        lines.append(f"private name imported: {module}:{line}: {text}")
    for module, line, text in graph.own_package_imports:
        lines.append(f"import from its own package's __init__ (import the defining module): {module}:{line}: {text}")
    return lines


def test_no_import_cycles_or_private_imports():
    found = problems(PACKAGE_DIR)
    assert not found, "\n".join(found)


FUNCTION_IMPORTS_ALLOWED = ("concept_influence.cli", "concept_influence.testing")
"""Where the package's own modules may be imported inside functions: the CLI's commands (``--help`` stays fast
without torch and the models) and the test helpers (run in subprocesses, each importing what it needs)."""


def test_function_imports_only_where_listed():
    graph = import_graph(PACKAGE_DIR)
    elsewhere = [
        f"{module}:{line}: {text}"
        for module, line, text in graph.function_imports
        if not any(module == p or module.startswith(p + ".") for p in FUNCTION_IMPORTS_ALLOWED)
    ]
    assert not elsewhere, "import these at module level (no cycle forces them inside):\n" + "\n".join(elsewhere)


def folder_of(module: str) -> str:
    """A module's folder: its subpackage below the root (``attribution``), or the module itself for a top-level
    module (``pipeline``)."""
    return ".".join(module.split(".")[:2])


def test_no_two_way_dependencies_between_folders():
    graph = import_graph(PACKAGE_DIR)
    folders: dict[str, set[str]] = {}
    for module, targets in graph.edges.items():
        if module == PACKAGE_DIR.name:
            continue  # the root __init__ re-exports every folder's API
        for target in targets:
            if folder_of(target) != folder_of(module):
                folders.setdefault(folder_of(module), set()).add(folder_of(target))
    cycles = import_cycles(folders)
    assert not cycles, "folders that depend on each other: " + "; ".join(" <-> ".join(c) for c in cycles)


LOWER_LAYERS = {
    "concept_influence.gradients": ("concept_influence.models",),
    "concept_influence.files": (),
    "concept_influence.settings": (),
}
"""Modules below the stages and the only parts of the package they may import: gradient capture (below
``curvature/``, ``attribution/`` and ``store/``), file safety and settings (below everything)."""

MOVED = {
    "concept_influence.curvature.loss": "concept_influence.gradients.loss",
    "concept_influence.data.atomic": "concept_influence.files",
}
"""Old homes kept as re-exports for users' code; the package itself imports the new ones."""


def test_lower_layers_import_nothing_above_them():
    graph = import_graph(PACKAGE_DIR)
    wrong = []
    for module, targets in graph.edges.items():
        for layer, allowed in LOWER_LAYERS.items():
            if module == layer or module.startswith(layer + "."):
                wrong += [
                    f"{module} -> {t}"
                    for t in targets
                    if not (
                        t == layer or t.startswith(layer + ".") or any(t == a or t.startswith(a + ".") for a in allowed)
                    )
                ]
    assert not wrong, "a lower layer imports a stage above it: " + "; ".join(wrong)


def test_package_imports_new_homes_and_capture_not_from_the_fit_driver():
    graph = import_graph(PACKAGE_DIR)
    old = [
        f"{module} -> {t}"
        for module, targets in graph.edges.items()
        for t in targets
        if t in MOVED and module not in MOVED
    ]
    assert not old, "import the new home: " + "; ".join(old)
    capture = ("gradient_mode", "loss_backward", "capture_loss_gradients", "HEAD_CHUNK_ELEMENTS")
    found = []
    for path in PACKAGE_DIR.rglob("*.py"):
        if path.name == "fit.py" and path.parent.name == "curvature":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "concept_influence.curvature.fit":
                found += [f"{path.relative_to(PACKAGE_DIR)}: {a.name}" for a in node.names if a.name in capture]
    assert not found, "take gradient capture from concept_influence.gradients.capture: " + "; ".join(found)


# --- the test of the test ---------------------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / next(iter(files)).split("/")[0]


def test_checker_reports_a_cycle(tmp_path):
    package = _write(
        tmp_path,
        {
            "fakepkg/__init__.py": "",
            "fakepkg/a.py": "from fakepkg.b import thing\n",
            "fakepkg/b.py": "def thing():\n    from fakepkg import c\n    return c\n",
            "fakepkg/c.py": "from .a import thing  # noqa\n",
            "fakepkg/d.py": "import fakepkg.a\n",
        },
    )
    graph = import_graph(package)
    assert graph.edges["fakepkg.b"] == {"fakepkg.c"}
    assert graph.edges["fakepkg.c"] == {"fakepkg.a"}
    assert graph.edges["fakepkg.d"] == {"fakepkg.a"}
    assert import_cycles(graph.edges) == [["fakepkg.a", "fakepkg.b", "fakepkg.c"]]
    assert graph.function_imports == [("fakepkg.b", 2, "from fakepkg import c")]
    found = problems(package)
    assert len(found) == 1 and found[0].startswith("import cycle: fakepkg.a -> fakepkg.b")


def test_checker_reports_a_type_checking_cycle_and_nested_packages(tmp_path):
    package = _write(
        tmp_path,
        {
            "fakepkg/__init__.py": "from fakepkg.sub.x import X\n",
            "fakepkg/sub/__init__.py": "from .x import X\n",
            "fakepkg/sub/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..y import Y\nX = 1\n",
            "fakepkg/y.py": "from fakepkg.sub.x import X\nY = X\n",
        },
    )
    graph = import_graph(package)
    assert graph.edges["fakepkg"] == {"fakepkg.sub.x"}
    assert graph.edges["fakepkg.sub"] == {"fakepkg.sub.x"}
    assert graph.edges["fakepkg.sub.x"] == {"fakepkg.y"}
    assert import_cycles(graph.edges) == [["fakepkg.sub.x", "fakepkg.y"]]


def test_checker_reports_private_names_and_own_package_imports(tmp_path):
    package = _write(
        tmp_path,
        {
            "fakepkg/__init__.py": "from fakepkg.a import helper\n",
            "fakepkg/a.py": "def helper():\n    pass\n\ndef _private():\n    pass\n\n__all__ = ['helper']\n",
            "fakepkg/b.py": "from fakepkg.a import __all__, _private, helper\n",
            "fakepkg/c.py": "from . import helper\n",
            "fakepkg/sub/__init__.py": "def main():\n    pass\n",
            "fakepkg/sub/__main__.py": "from fakepkg.sub import main\n",
        },
    )
    found = problems(package)
    assert "private name imported: fakepkg.b:1: from fakepkg.a import _private" in found
    own = [line for line in found if "own package" in line]
    assert own == [
        "import from its own package's __init__ (import the defining module): fakepkg.c:1: from fakepkg import helper"
    ]
    # fakepkg -> fakepkg.a is the re-export; fakepkg.c -> fakepkg closes no cycle here, but is still reported
    assert not [line for line in found if line.startswith("import cycle")]
    assert len(found) == 2


def test_checker_passes_a_clean_package(tmp_path):
    package = _write(
        tmp_path,
        {
            "fakepkg/__init__.py": "from fakepkg.a import helper\nfrom fakepkg.b import use\n",
            "fakepkg/a.py": "import os\n\ndef helper():\n    return os.sep\n",
            "fakepkg/b.py": "from fakepkg.a import helper\n\ndef use():\n    import json\n    return helper(), json\n",
        },
    )
    assert problems(package) == []


def test_old_homes_still_import():
    from concept_influence import files
    from concept_influence.curvature import fit, loss
    from concept_influence.data import atomic
    from concept_influence.gradients import capture
    from concept_influence.gradients import loss as new_loss

    assert atomic.folder_lock is files.folder_lock and atomic.file_in_folder is files.file_in_folder
    assert fit.gradient_mode is capture.gradient_mode and fit.capture_loss_gradients is capture.capture_loss_gradients
    assert fit.loss_backward is capture.loss_backward and loss.sequence_losses is new_loss.sequence_losses
