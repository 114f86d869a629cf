"""The import graph of the repository, read with `ast` (no module is imported): imports point down the
floors data -> models -> ddpo core -> wings -> the `ddpo` command -> experiments, with no cycle, no
`sys.path` edit and no use of another module's private (`_name`) names. docs/ARCHITECTURE.md has the map."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("data", "models", "ddpo", "experiments")
PACKAGES = ("ddpo", "experiments")  # the import names: data/ and models/ are ddpo.data and ddpo.models

# The core, named one by one: a new module of ddpo/ must be placed on a floor here on purpose.
CORE = {
    "ddpo",
    "ddpo.checkpoint",
    "ddpo.cli",
    "ddpo.config",
    "ddpo.corruption",
    "ddpo.distributed",
    "ddpo.export",
    "ddpo.loss",
    "ddpo.plan",
    "ddpo.progress",
    "ddpo.reference",
    "ddpo.run_identity",
    "ddpo.run_summary",
    "ddpo.sampler",
    "ddpo.schedule",
    "ddpo.token_weights",
    "ddpo.train",
    "ddpo.trainer",
}
WINGS = ("ddpo.eval", "ddpo.lab", "ddpo.online", "ddpo.sweep", "ddpo.hub", "ddpo.benchmarking", "ddpo.estimate")
COMMAND = {"ddpo.commands", "ddpo.__main__"}
FLOORS = ["data", "models", "ddpo core", "ddpo wings", "ddpo command", "experiments"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] in ("data", "models"):
        parts.insert(0, "ddpo")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# rglob does not follow the links ddpo/data and ddpo/models, so each file is read once, from its folder.
MODULES = {module_name(p): p for folder in FOLDERS for p in (REPO / folder).rglob("*.py") if "results" not in p.parts}


def floor(module: str) -> str:
    for top in ("ddpo.data", "ddpo.models", "experiments"):
        if module == top or module.startswith(top + "."):
            return top.removeprefix("ddpo.")
    if module in CORE:
        return "ddpo core"
    if module in COMMAND:
        return "ddpo command"
    if any(module == w or module.startswith(w + ".") for w in WINGS):
        return "ddpo wings"
    raise AssertionError(f"{module} is on no floor: add it to CORE, WINGS or COMMAND in tests/test_imports.py")


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """(imported project module, names taken from it, line) for every import in the file, at any depth."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] in PACKAGES
        ):
            names = [a.name for a in node.names]
            # `from ddpo import sweep` imports the module ddpo.sweep
            found += [(f"{node.module}.{n}", [], node.lineno) for n in names if f"{node.module}.{n}" in MODULES]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES], node.lineno))
    return [(m, names, line) for m, names, line in found if m != module]


GRAPH = {m: {target for target, _, _ in imports(m) if target in MODULES} for m in MODULES}


def test_every_module_has_a_floor_and_imports_resolve():
    unknown = [(m, t, line) for m in MODULES for t, _, line in imports(m) if t not in MODULES]
    assert not unknown, f"imports of modules that do not exist: {unknown}"
    for m in MODULES:
        floor(m)


def test_imports_only_point_down():
    upward = [
        f"{m} ({floor(m)}) -> {t} ({floor(t)})"
        for m, targets in GRAPH.items()
        for t in targets
        if FLOORS.index(floor(t)) > FLOORS.index(floor(m))
    ]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan): each is an import cycle."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert not cycles(GRAPH), f"import cycles: {cycles(GRAPH)}"


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {m: set(targets) for m, targets in GRAPH.items()}
    planted["ddpo.loss"].add("ddpo.trainer")  # the trainer imports the loss: now they import each other
    assert any({"ddpo.loss", "ddpo.trainer"} <= set(cycle) for cycle in cycles(planted))


def test_no_private_names_across_modules():
    private = [
        f"{m}:{line} takes {n} from {t}"
        for m in MODULES
        for t, names, line in imports(m)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("root", ["data", "models", "ddpo", "experiments", "tests"])
def test_no_sys_path_edits(root):
    edits = [
        str(p.relative_to(REPO))
        for p in (REPO / root).rglob("*.py")
        if p != Path(__file__)
        and any(s in p.read_text(encoding="utf-8") for s in ("sys.path.insert", "sys.path.append"))
    ]
    assert not edits, f"sys.path edits in {edits}: import through the installed packages (pip install -e .)"


def test_data_and_models_are_imported_as_ddpo_subpackages():
    """A bare `import data` / `from models...` would load the folder a second time under another name (two
    copies of every class) and fails once installed: the wheel holds `ddpo` only."""
    bare = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            bare += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in ("data", "models")]
    assert not bare, "import these as ddpo.data / ddpo.models:\n" + "\n".join(bare)
