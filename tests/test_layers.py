"""The packages' import layers (README, "Layout"): every import of pipeline/, launch/ and data_prep/ is read
with ast (module level, inside functions, under TYPE_CHECKING alike), and the test fails on

- a circle of imports between modules,
- an import from a lower layer to a higher one (or between two layers side by side),
- a private name (one leading underscore) imported from, or read off, another module.

LAYERS is the table to change when a module moves; a module in no layer fails the test until it is placed.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "launch", "data_prep")

# Highest first. A module imports modules of its own layer and of the rows below; layers on one row sit side
# by side and import none of each other. A module's layer is that of its longest listed prefix.
LAYERS: tuple[tuple[tuple[str, tuple[str, ...]], ...], ...] = (
    (("launch", ("launch",)),),
    (("trainer", ("pipeline.trainer",)),),
    (("tasks", ("pipeline.tasks",)),),
    (("evaluation", ("pipeline.evaluation",)),),
    # A family is made of models and data and is asked by evaluation and tasks (pipeline/families/__init__.py);
    # it names its training task as a 'module:Class' string, which is not an import.
    (("families", ("pipeline.families",)),),
    # reporting reads run directories only: none of trainer, tasks, evaluation or models.
    (("models", ("pipeline.models",)), ("data", ("pipeline.data",)), ("reporting", ("pipeline.reporting",))),
    # What training and evaluation share, none of which knows a model or a dataset format.
    (("support", ("pipeline.checkpoint", "pipeline.run_mirror", "pipeline.remote_refs", "pipeline.preemption",
                  "pipeline.engine", "pipeline.optim", "pipeline.lamb", "pipeline.precision", "pipeline.metrics",
                  "pipeline.class_names", "pipeline.sample_counts")),),
    (("config", ("pipeline.config",)),),
    (("storage", ("pipeline.storage", "pipeline")),),
)
# data_prep stands on its own: it writes shards with the readers' low layers and is imported by launch only.
DATA_PREP = ("data_prep", ("data_prep",))
DATA_PREP_MAY_IMPORT = ("data_prep", "data", "storage")
# ... except its one model module: CLIP scores for `data-prep filter` come from any checkpoint `launch eval`
# resolves, so it asks pipeline.evaluation's resolver (imported lazily; no other data_prep module imports a model).
DATA_PREP_MODEL_MODULES = {"data_prep.clip_score": ("evaluation",)}
DATA_PREP_IMPORTED_BY = ("data_prep", "launch")

# Imports that break the rules while issue 13's other parts land; each entry names who removes it. The test
# also fails on an entry that no longer occurs, so this list only shrinks.
PENDING: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _known(name: str) -> str | None:
    """The module of ours `name` refers to (a module, or a name inside one), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


class _Imports(ast.NodeVisitor):
    """Every import of one module: (line, target module, private name or None)."""

    def __init__(self, module: str, is_package: bool):
        self.module, self.package = module, module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[int, str, str | None]] = []
        self.aliases: dict[str, str] = {}  # local name -> module of ours it is bound to

    def _absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[:len(base) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _known(alias.name)
            if target:
                self.found.append((node.lineno, target, None))
                self.aliases[alias.asname or alias.name.partition(".")[0]] = (
                    target if alias.asname else alias.name.partition(".")[0])

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = self._absolute(node)
        for alias in node.names:
            if f"{base}.{alias.name}" in MODULES:  # from pipeline import storage
                self.found.append((node.lineno, f"{base}.{alias.name}", None))
                self.aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
                continue
            target = _known(base)
            if target:
                self.found.append((node.lineno, target, alias.name if _private(alias.name) else None))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        # module._name, module bound by an import above (storage._client, checkpoint._x)
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and _private(node.attr):
            self.found.append((node.lineno, self.aliases[node.value.id], node.attr))
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imports() -> dict[str, list[tuple[int, str, str | None]]]:
    graph = {}
    for module, path in MODULES.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        graph[module] = [(line, target, name) for line, target, name in visitor.found if target != module]
    return graph


IMPORTS = _imports()


def _layer_of(module: str) -> tuple[str, int]:
    """(layer name, row); data_prep's row is -1 (it is no part of the stack)."""
    best: tuple[int, str, int] | None = None
    rows = [(row, layer) for row, layers in enumerate(LAYERS) for layer in layers] + [(-1, DATA_PREP)]
    for row, (name, prefixes) in rows:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), name, row)
    assert best is not None, f"{module}: in no layer of tests/test_layers.py's LAYERS; place it there"
    return best[1], best[2]


def _layer_problem(source: str, target: str) -> str | None:
    (source_layer, source_row), (target_layer, target_row) = _layer_of(source), _layer_of(target)
    if source_layer == target_layer:
        return None
    if source_layer == "data_prep":
        allowed = DATA_PREP_MAY_IMPORT + DATA_PREP_MODEL_MODULES.get(source, ())
        return None if target_layer in allowed else f"data_prep may import only {allowed}"
    if target_layer == "data_prep":
        return None if source_layer in DATA_PREP_IMPORTED_BY else "only launch imports data_prep"
    if target_row > source_row:
        return None
    return f"{source_layer} sits {'beside' if target_row == source_row else 'below'} {target_layer}"


def _violations() -> dict[tuple[str, str], str]:
    found = {}
    for source, imports in IMPORTS.items():
        for line, target, private in imports:
            where = f"{MODULES[source].relative_to(REPO)}:{line}"
            problem = _layer_problem(source, target)
            if problem:
                found.setdefault((source, target), f"{where}: {source} imports {target} ({problem})")
            if private:
                found.setdefault((source, f"{target}.{private}"),
                                 f"{where}: {source} uses {target}.{private}, a private name of another module")
    return found


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: sorted({t for _, t, _ in imports}) for m, imports in IMPORTS.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
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
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer_of(module)


def test_no_import_circles():
    circles = [c for c in _cycles() if not any((s, t) in PENDING for s in c for _, t, _ in IMPORTS[s] if t in c)]
    assert not circles, "import circles:\n" + "\n".join(
        " <-> ".join(c) + "".join(sorted({f"\n    {MODULES[s].relative_to(REPO)}:{line}: {s} imports {t}"
                                         for s in c for line, t, _ in IMPORTS[s] if t in c}))
        for c in circles)


def test_imports_go_down_the_layers_and_no_private_names_cross_modules():
    violations = _violations()
    unexpected = [message for key, message in sorted(violations.items()) if key not in PENDING]
    assert not unexpected, "\n".join(unexpected)
    circle_edges = {(s, t) for c in _cycles() for s in c for _, t, _ in IMPORTS[s] if t in c}
    stale = [f"{key}: {who}" for key, who in PENDING.items() if key not in violations and key not in circle_edges]
    assert not stale, "PENDING entries that no longer occur (remove them):\n" + "\n".join(stale)


def test_the_checker_sees_what_it_must():
    """The rules fire on a lower-to-higher import, a private name and a function-level import."""
    source = ("def f():\n    from pipeline.trainer import run_worker\n"
              "from pipeline.data.stream import _seed\nimport pipeline.storage as st\nst._client\n")
    visitor = _Imports("pipeline.models.x", is_package=False)
    visitor.visit(ast.parse(source))
    assert [(t, p) for _, t, p in visitor.found] == [
        ("pipeline.trainer", None), ("pipeline.data.stream", "_seed"), ("pipeline.storage", None),
        ("pipeline.storage", "_client")]
    assert _layer_problem("pipeline.models.residual", "pipeline.trainer") == "models sits below trainer"
    assert _layer_problem("pipeline.models.residual", "pipeline.data.stream") == "models sits beside data"
    assert _layer_problem("pipeline.data.stream", "pipeline.storage") is None
    assert _layer_problem("data_prep.job", "pipeline.tasks") is not None
    assert _layer_problem("data_prep.filter", "pipeline.evaluation.resolver") is not None
    assert _layer_problem("data_prep.clip_score", "pipeline.evaluation.resolver") is None
    assert _layer_problem("pipeline.data.stream", "data_prep.writer") == "only launch imports data_prep"
