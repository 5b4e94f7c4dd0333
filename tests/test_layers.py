"""The package's import graph obeys its layers: no module imports one of a higher layer, and no cycle.

The graph is read with ``ast`` from the sources (nothing is imported): every ``import`` of an
``orchestrator`` module counts, at the top of a module or inside a function (a lazy import is
still a dependency); one under ``if TYPE_CHECKING:`` does not (it is a type, not a call).
The simulator package counts as one module. A new module must be given a layer here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import orchestrator

PACKAGE = Path(orchestrator.__file__).parent

LAYERS: tuple[tuple[str, frozenset[str]], ...] = (
    # Lowest first. A module may import its own layer (the graph stays acyclic) and those below.
    (
        "foundation",
        frozenset(
            {
                "_version",
                "errors",
                "secret",
                "context",
                "logs",
                "sharding",
                "framing",
                "blockcheck",
                "durations",
                "location",
                "simulator",
                "offload",
            }
        ),
    ),
    ("settings", frozenset({"models", "retry", "endpoint", "config_yaml", "config"})),
    (
        "client and validation",
        frozenset({"transport", "stream", "api", "queries", "ndjson", "validate_worker", "pooled_checker", "workers"}),
    ),
    (
        "files and records",
        frozenset(
            {
                "part_file",
                "transfer",
                "download",
                "objstore",
                "objstore_base",
                "objstore_upload",
                "objstore_lock",
                "record",
                "journal",
                "manifest",
                "retention",
                "guards",
            }
        ),
    ),
    ("sinks", frozenset({"sink", "bucket_sink"})),
    ("reports", frozenset({"status", "progress", "metrics"})),
    ("run", frozenset({"scheduler", "polling", "fetch", "failures", "executions"})),
    ("composition", frozenset({"app", "plan", "supervise", "results"})),
    (
        "entry",
        frozenset({"__init__", "__main__", "cli", "cli_common", "cli_download", "cli_ops", "cli_run"}),
    ),
)

KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {
    # (importer, imported): why it is still there. The test fails once an edge is gone, so
    # that the exception is removed with it.
}


def _module_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (imports there are for types only)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                inside.update(id(n) for n in ast.walk(child))
    return inside


def _imported(node: ast.AST, importer: str, known: set[str]) -> set[str]:
    """The package modules an import statement names (``from orchestrator import x`` names x)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name.split(".")[1] for a in node.names if a.name.startswith("orchestrator.")]
    elif isinstance(node, ast.ImportFrom):
        if node.level > 1 or (node.level == 1 and importer == "simulator"):
            return set()  # inside the simulator package: one module
        module = node.module or ""
        if node.level == 1:
            names = [module.split(".")[0]] if module else [a.name for a in node.names]
        elif module == "orchestrator":
            names = [a.name for a in node.names]
        elif module.startswith("orchestrator."):
            names = [module.split(".")[1]]
    return {n for n in names if n in known and n != importer}


def import_graph() -> dict[str, set[str]]:
    """Module → the package modules it imports at run time (lazily or not)."""
    files = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    known = {_module_of(p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in known}
    for path in files:
        importer = _module_of(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in typing_only:
                graph[importer] |= _imported(node, importer, known)
    return graph


def _rank() -> dict[str, int]:
    return {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every (importer, imported) where the imported module sits in a higher layer."""
    rank = _rank()
    return {(a, b) for a, deps in graph.items() for b in deps if rank[b] > rank[a]}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles (each as a path that returns to its start), by depth-first search."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer() -> None:
    """A module missing from LAYERS (a new one) fails: its place in the graph must be decided."""
    missing = set(import_graph()) - set(_rank())
    assert not missing, f"give these modules a layer in tests/test_layers.py: {sorted(missing)}"
    ghosts = set(_rank()) - set(import_graph())
    assert not ghosts, f"LAYERS names modules that do not exist: {sorted(ghosts)}"


def test_no_module_imports_a_higher_layer() -> None:
    """Lower layers never import higher ones (lazy imports included), apart from the listed exceptions."""
    rank = _rank()
    names = [name for name, _ in LAYERS]
    up = upward_imports(import_graph())
    unexpected = sorted(up - set(KNOWN_EXCEPTIONS))
    assert not unexpected, "upward imports: " + "; ".join(
        f"{a} ({names[rank[a]]}) imports {b} ({names[rank[b]]})" for a, b in unexpected
    )
    stale = sorted(set(KNOWN_EXCEPTIONS) - up)
    assert not stale, f"these exceptions no longer happen, remove them from KNOWN_EXCEPTIONS: {stale}"


def test_the_import_graph_has_no_cycle() -> None:
    """No module imports itself back through others, even within one layer (lazy imports included)."""
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" → ".join(c) for c in found)


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    """The checks themselves fail on a made-up graph with an upward import and a cycle."""
    graph = {m: set[str]() for m in _rank()}
    graph["errors"].add("scheduler")
    graph["sink"].add("bucket_sink")
    graph["bucket_sink"].add("sink")
    assert ("errors", "scheduler") in upward_imports(graph)
    assert ["bucket_sink", "sink", "bucket_sink"] in cycles(graph)
