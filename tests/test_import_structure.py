"""The house's structure, held by the suite: no import circle (between modules or between packages), signals and
data flow down (the layers below never import the commands above them), and training files stay readable.

Every import counts, including those inside functions: a lazy import hides a circle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import distil

SOURCE = Path(distil.__file__).parent

# Packages and modules below the commands: none of them may import what is listed against them.
COMMANDS = ("distil.training", "distil.evaluation", "distil.tasks", "distil.report", "distil.demo", "distil.cli",
            "distil.api", "distil.fit_head")
FORBIDDEN = {
    "distil.losses": COMMANDS + ("distil.data", "distil.teacher_cache", "distil.student", "distil.loading"),
    # the teacher's signals flow down into the engine: it never knows where they came from
    "distil.teacher_signal": COMMANDS + ("distil.data", "distil.teacher_cache", "distil.losses", "distil.student",
                                         "distil.loading", "distil.cross_tokenizer"),
    "distil.data": COMMANDS + ("distil.teacher_cache", "distil.losses", "distil.student"),
    "distil.teacher_cache": COMMANDS,
    "distil.student": COMMANDS + ("distil.teacher_cache",),
    "distil.layer_copy": COMMANDS + ("distil.teacher_cache", "distil.student", "distil.pruning"),
    "distil.pruning": COMMANDS + ("distil.teacher_cache",),
    "distil.checks": COMMANDS + ("distil.teacher_cache",),
    "distil.model_kinds": COMMANDS,
    "distil.config": COMMANDS + ("distil.data", "distil.losses", "distil.teacher_cache"),
    "distil.recipe_checks": COMMANDS + ("distil.config", "distil.data", "distil.losses", "distil.teacher_cache"),
}
LONGEST_TRAINING_FILE = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the distil modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in SOURCE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # `from distil.x import y` imports module distil.x.y when there is one
                    imported.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def room(module: str) -> str:
    """A module's package below distil (distil.training, distil.data, ...), or the module itself at the top."""
    return ".".join(module.split(".")[:2])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
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


def rooms_of(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        rooms.setdefault(room(module), set()).update(room(t) for t in targets if room(t) != room(module))
    return rooms


def test_import_structure_cycle_finder_finds_a_circle():
    """The checker itself: a planted circle between two packages and within one is found, a clean graph is not."""
    planted = {"distil.a.x": {"distil.b.y"}, "distil.b.y": {"distil.a.z"}, "distil.a.z": set()}
    assert cycles(planted) == []
    assert cycles(rooms_of(planted)) == [["distil.a", "distil.b"]]
    assert cycles({"m1": {"m2"}, "m2": {"m3"}, "m3": {"m1"}, "m4": {"m1"}}) == [["m1", "m2", "m3"]]


def test_import_structure_has_no_circle_between_modules():
    assert cycles(import_graph()) == []


def test_import_structure_has_no_circle_between_packages():
    assert cycles(rooms_of(import_graph())) == []


def test_import_structure_layers_below_never_import_the_commands_above():
    graph = import_graph()
    broken = sorted((module, target) for module, targets in graph.items() for target in targets
                    for lower, above in FORBIDDEN.items()
                    if room(module) == lower and any(target == a or target.startswith(a + ".") for a in above))
    assert broken == []


def test_import_structure_only_the_entry_point_imports_the_cli():
    importers = sorted(m for m, targets in import_graph().items() if "distil.cli" in targets)
    assert importers == ["distil.__main__"]


def test_import_structure_training_files_stay_readable():
    long = {p.name: n for p in (SOURCE / "training").glob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > LONGEST_TRAINING_FILE}
    assert long == {}


# Inside training: the teacher sources hand signals down to the objective and never import what consumes them.
SOURCES_NEVER_IMPORT = ("distil.training.objective", "distil.training.loop", "distil.training.heldout",
                        "distil.training.models")


def test_import_structure_teacher_sources_never_import_their_consumers():
    graph = import_graph()
    broken = sorted((module, target) for module, targets in graph.items() if module.startswith("distil.training.sources")
                    for target in targets if target in SOURCES_NEVER_IMPORT)
    assert [m for m in graph if m.startswith("distil.training.sources.")]
    assert broken == []
