"""The package's shape (issue 28): no import cycle in carat/, at module or function level, and no module imports a
command module (the commands are thin users of the library, never the other way round)."""

from __future__ import annotations

import ast
from pathlib import Path

CARAT = Path(__file__).resolve().parents[1] / "carat"
COMMANDS = {"carat.evaluate", "carat.predict", "carat.export", "carat.train.__main__", "carat.tune.__main__",
            "carat.data.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(CARAT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The carat modules ``path`` imports anywhere (functions included), annotations-only imports excepted."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in CARAT.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_a_command():
    """Library code, and commands too (``carat.tune`` provisions its corpus through carat.data, not through
    ``carat.train``'s command module)."""
    graph = import_graph()
    assert {name: sorted(graph[name] & COMMANDS) for name in graph if graph[name] & COMMANDS} == {}


def test_the_commands_are_thin_users_of_one_inference_home():
    graph = import_graph()
    for command in ("carat.evaluate", "carat.predict", "carat.export"):
        assert "carat.inference" in graph[command], command
    assert "carat.inference" in graph["carat.train.evaluation"] and "carat.inference" in graph["carat.ensemble"]


def test_carat_data_is_grouped_by_stage():
    """carat/data/ holds its three stages as packages and, beside them, only its command. Each stage's
    ``__init__`` says what lives there and re-exports nothing; the loader's names every module of its package
    (its stages, in order, in one place)."""
    data = CARAT / "data"
    assert sorted(p.name for p in data.glob("*.py")) == ["__init__.py", "__main__.py"]
    assert sorted(p.name for p in data.iterdir() if (p / "__init__.py").is_file()) == ["corpus", "loader", "sources"]
    for stage in ("sources", "corpus", "loader"):
        tree = ast.parse((data / stage / "__init__.py").read_text())
        assert ast.get_docstring(tree), stage
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], stage
    stages = ast.get_docstring(ast.parse((data / "loader" / "__init__.py").read_text()))
    missing = [p.stem for p in (data / "loader").glob("*.py") if p.stem != "__init__" and p.stem not in stages]
    assert missing == []
