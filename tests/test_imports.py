"""The import graph between dammerge's parts has no loop, and no import hides from it.

A *part* is a top-level subpackage (``learned``, ``scoring``, ...) or a top-level module
(``merge``, ``config``, ...). Every ``import`` statement counts, wherever it stands (module
level, inside a function, under ``TYPE_CHECKING``): an import deferred into a function is
still a dependency, and deferring one is how a loop hides. ``importlib.import_module`` and
``__import__`` would hide a dependency from this graph altogether, so no module may use them
to reach a dammerge module.

The package's own ``__init__`` (``import dammerge`` for ``__version__``) is not a part: it only
re-exports the public API.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "dammerge"
SOURCE = Path(__file__).resolve().parents[1] / "src" / PACKAGE
DYNAMIC_IMPORTERS = {"import_module", "__import__"}


@dataclass(frozen=True)
class Site:
    """Where an import happens: ``dammerge/file.py:line``."""

    file: str
    line: int

    @classmethod
    def of(cls, root: Path, path: Path, line: int) -> Site:
        return cls(path.relative_to(root.parent).as_posix(), line)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(root: Path, path: Path) -> str:
    """The dotted name of the module in ``path`` (a package's ``__init__`` is the package)."""
    parts = [root.name, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(root: Path, dotted: str) -> str | None:
    """The part a dotted module name belongs to (None: the package itself, or outside it)."""
    pieces = dotted.split(".")
    if pieces[0] != root.name or len(pieces) == 1:
        return None
    return pieces[1]


def _absolute(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_modules(root: Path, path: Path) -> list[tuple[str, int]]:
    """Every dammerge module that ``path`` imports, with the line of the import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = module_name(root, path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node, path.name == "__init__.py")
            found.append((source, node.lineno))
            # `from dammerge import memory` imports the submodule dammerge.memory
            found += [(f"{source}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if _exists(root, name)]


def _exists(root: Path, dotted: str) -> bool:
    pieces = dotted.split(".")
    if pieces[0] != root.name:
        return False
    folder = root.joinpath(*pieces[1:])
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def part_graph(root: Path) -> dict[str, dict[str, list[Site]]]:
    """``graph[a][b]``: the sites where part ``a`` imports part ``b``."""
    graph: dict[str, dict[str, list[Site]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(root.rglob("*.py")):
        source = part_of(root, module_name(root, path))
        if source is None:
            continue
        graph[source]  # every part is a node, even one that imports nothing
        for name, line in imported_modules(root, path):
            target = part_of(root, name)
            if target is not None and target != source:
                graph[source][target].append(Site.of(root, path, line))
    return graph


def cycles(graph: dict[str, dict[str, list[Site]]]) -> list[list[str]]:
    """The strongly connected parts with more than one member (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def describe_cycle(graph: dict[str, dict[str, list[Site]]], members: list[str]) -> str:
    edges = [
        f"{a} -> {b} ({graph[a][b][0]})" for a in members for b in members if b in graph.get(a, {})
    ]
    return "; ".join(edges)


def dynamic_imports(root: Path) -> list[str]:
    """Calls of ``import_module`` / ``__import__`` that may load a dammerge module.

    Only a string literal naming a module outside dammerge is allowed (an optional third-party
    dependency); a computed name could be anything, so it counts.
    """
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name not in DYNAMIC_IMPORTERS:
                continue
            first = node.args[0] if node.args else None
            literal = isinstance(first, ast.Constant) and isinstance(first.value, str)
            if literal and first.value.split(".")[0] != root.name:
                continue
            found.append(str(Site.of(root, path, node.lineno)))
    return found


# --------------------------------------------------------------------------- the package


def test_the_parts_of_dammerge_import_each_other_without_a_loop():
    graph = part_graph(SOURCE)
    assert {"learned", "evolve", "evaluate", "family", "data", "scoring"} <= set(graph)
    loops = [describe_cycle(graph, members) for members in cycles(graph)]
    assert not loops, "import loops between parts: " + " | ".join(loops)


def test_the_data_and_scoring_floor_imports_no_consumer():
    graph = part_graph(SOURCE)
    assert set(graph["data"]) <= {"errors", "templates"}
    assert set(graph["scoring"]) <= {"data", "errors", "templates"}
    for consumer in ("family", "evaluate"):
        assert "scoring" in graph[consumer]
    assert "evaluate" not in graph["family"]


def test_no_module_imports_a_dammerge_module_by_name_at_run_time():
    found = dynamic_imports(SOURCE)
    assert not found, "dynamic imports that the import graph cannot see: " + ", ".join(found)


# --------------------------------------------------------------------------- the checker itself


def _package(root: Path, files: dict[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_the_checker_finds_a_loop_hidden_in_a_function(tmp_path):
    package = _package(
        tmp_path,
        {
            "__init__.py": "from dammerge.merge import run\n",
            "merge.py": "from dammerge import config\n\ndef run():\n    pass\n",
            "config.py": "",
            "learned/__init__.py": "",
            "learned/run.py": "def go():\n    from dammerge.merge import run\n",
            "evolve/__init__.py": "from .run import go\n",
            "evolve/run.py": "from ..learned import run\n\ndef go():\n    pass\n",
        },
    )
    graph = part_graph(package)
    assert cycles(graph) == []
    assert set(graph["evolve"]) == {"learned"} and set(graph["learned"]) == {"merge"}
    (package / "merge.py").write_text("def run():\n    from dammerge.evolve import go\n")
    assert cycles(part_graph(package)) == [["evolve", "learned", "merge"]]
    assert "merge -> evolve (dammerge/merge.py:2)" in describe_cycle(
        part_graph(package), ["evolve", "learned", "merge"]
    )


@pytest.mark.parametrize(
    ("call", "flagged"),
    [
        ("importlib.import_module('dammerge.learned.run')", True),
        ("importlib.import_module(name)", True),
        ("import_module(f'dammerge.{name}')", True),
        ("__import__('dammerge.merge')", True),
        ("importlib.import_module('lm_eval.tasks')", False),
    ],
)
def test_the_checker_finds_dynamic_imports(tmp_path, call, flagged):
    package = _package(tmp_path, {"__init__.py": "", "merge.py": f"name = 'x'\n{call}\n"})
    assert bool(dynamic_imports(package)) == flagged
