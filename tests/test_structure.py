"""The package's import graph has no cycles.

Built from the source by AST (nothing is imported): module-level and function-level imports
count, ``if TYPE_CHECKING:`` blocks do not. An edge A -> B when A imports module B or a name
from it; ``from omninet.x import y`` is an edge to ``omninet.x.y`` when y is a submodule, and
a name a package ``__init__`` re-exports (``from omninet.x.impl import y`` there) resolves to
the module that defines it, so an ``__init__`` that only re-exports is not a hub of false
cycles. Implicit imports of parent packages are not edges.

And importing the package (or the ``omninet`` command's module) loads none of the platform's
heavy dependencies: those load with the sweep, serving or tracking code that uses them.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "omninet"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node outside ``if TYPE_CHECKING:`` bodies (else branches count)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> ['path:line', ...]} for modules inside the package."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    trees = {m: ast.parse(p.read_text(), filename=str(p)) for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}

    # Names each package __init__ binds by a module-level `from X import name` (its re-exports).
    reexports: dict[str, dict[str, str]] = {}
    for pkg in packages:
        for node in trees[pkg].body:
            if isinstance(node, ast.ImportFrom):
                src = _absolute(node, pkg, True)
                for alias in node.names:
                    if f"{src}.{alias.name}" not in files:
                        reexports.setdefault(pkg, {})[alias.asname or alias.name] = src

    def resolve(target: str, name: str | None) -> str | None:
        if name is not None and f"{target}.{name}" in files:
            return f"{target}.{name}"
        seen = set()
        while name is not None and target in reexports and name in reexports[target] and target not in seen:
            seen.add(target)
            target = reexports[target][name]
        while target and target not in files:  # `import omninet.x.y.z` of a non-module: its module
            target = target.rpartition(".")[0]
        return target if target.split(".")[0] == PACKAGE.name else None

    graph: dict[str, dict[str, list[str]]] = {m: {} for m in files}
    for module, tree in trees.items():
        where = files[module].relative_to(PACKAGE.parent)
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [resolve(a.name, None) for a in node.names]
            else:
                src = _absolute(node, module, module in packages)
                targets = [resolve(src, a.name) for a in node.names]
            for t in dict.fromkeys(targets):
                if t is not None and t != module:
                    graph[module].setdefault(t, []).append(f"{where}:{node.lineno}")
    return graph


def strongly_connected(graph: dict[str, dict]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module, sorted."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def _describe(graph, comp: list[str]) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b}  ({', '.join(graph[a][b])})" for a in comp for b in sorted(graph[a]) if b in members]
    return f"  cycle among {', '.join(comp)}:\n" + "\n".join(edges)


def test_the_graph_sees_what_it_should():
    graph = import_graph()
    assert "omninet.config" in graph["omninet.model"]
    assert "omninet.model" in graph["omninet.hardware.memory"]  # a function-level import counts
    assert "omninet.attention.registry" in graph["omninet.attention.block_sparse"]  # re-export resolved
    assert "omninet.gating" in graph["omninet.model"]  # `from omninet import gating`: the submodule
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\ndef f():\n    import c\n"
    assert [n.names[0].name for n in _imports(ast.parse(source)) if isinstance(n, ast.Import)] == ["c", "b"]
    assert strongly_connected({"a": {"b": []}, "b": {"a": []}, "c": {"a": []}}) == [["a", "b"]]


def test_no_import_cycles():
    graph = import_graph()
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles in omninet:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_serve_sits_on_top():
    """Nothing below serving imports it (the saved-model format and the MLflow model live below the
    trial and the sweep), and serving reaches the sweep through public names only."""
    graph = import_graph()
    upward = [f"{m} -> {t} ({', '.join(where)})" for m, targets in graph.items()
              if m.split(".")[:2] != ["omninet", "serve"] and m != "omninet.cli"  # the command line delegates to it
              for t, where in targets.items() if t.split(".")[:2] == ["omninet", "serve"]]
    assert not upward, "imports of omninet.serve from below it:\n" + "\n".join(upward)
    private = []
    for path in sorted((PACKAGE / "serve").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("omninet.sweep"):
                private += [f"{path.name}:{node.lineno} {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                private.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert not private, "serve uses private names of other modules: " + ", ".join(private)


def test_lower_layers_do_not_import_higher_ones():
    """The layers, bottom up: the model and its kernels, the trial, the sweep, serving. A trial
    runs without the sweep (the platform calls it through ``omninet.trial.runners``), and a
    kernel file reaches other kernels through the registry, not through the package."""
    graph = import_graph()
    higher = {"omninet.trial": ("omninet.sweep", "omninet.serve"),
              "omninet.attention": ("omninet.trial", "omninet.sweep", "omninet.serve")}
    upward = [f"{m} -> {t} ({', '.join(where)})" for m, targets in graph.items() for t, where in targets.items()
              for layer, above in higher.items()
              if (m == layer or m.startswith(layer + ".")) and any(t == a or t.startswith(a + ".") for a in above)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)
    package = [f"{m} ({', '.join(where)})" for m, targets in graph.items() if m.startswith("omninet.attention.")
               for t, where in targets.items() if t in ("omninet", "omninet.attention")]
    assert not package, "kernel files importing the package instead of the registry: " + ", ".join(package)


HEAVY = ("ray", "mlflow", "optuna", "sklearn", "transformers", "plotly", "pyarrow")


def test_importing_omninet_loads_no_heavy_dependency():
    """A fresh interpreter: ``import omninet``, the model classes and the CLI module leave every
    module of ``HEAVY`` unimported (a module-level import of omninet.sweep, omninet.tasks or
    omninet.mlflow_model from below them would pull one in)."""
    code = ("import sys\nimport omninet, omninet.cli\nfrom omninet import AdvancedTransformer, OmniNetModel\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "", f"import omninet loaded {out.stdout.strip()}"
