"""The house rules of docs/ARCHITECTURE.md, read from the source with `ast`: settings travel as one object
(no function of the package takes more than 8 parameters), a function reads in one sitting (80 lines at
most), and each public name is defined in one module (one home, one argument order)."""

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("ddpo", "models", "data")  # ddpo/models and ddpo/data are links: rglob reads each file once
MAX_PARAMETERS = 8
MAX_LINES = 80
ENTRY_POINTS = {"main"}  # each command module has its own


def package_files() -> list[Path]:
    return sorted(p for folder in PACKAGE_FOLDERS for p in (REPO / folder).rglob("*.py"))


def functions(tree: ast.AST):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def parameter_count(node: ast.FunctionDef) -> int:
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return len(names) - (1 if names and names[0] in ("self", "cls") else 0)


def where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO)}:{node.lineno} {getattr(node, 'name', '')}"


TREES = {path: ast.parse(path.read_text(encoding="utf-8")) for path in package_files()}


def test_no_function_takes_more_than_8_parameters():
    wide = [
        f"{where(p, f)} ({parameter_count(f)})"
        for p, t in TREES.items()
        for f in functions(t)
        if parameter_count(f) > MAX_PARAMETERS
    ]
    assert not wide, "group these settings into one typed object:\n" + "\n".join(wide)


def test_no_function_spans_more_than_80_lines():
    long = [
        f"{where(p, f)} ({f.end_lineno - f.lineno + 1} lines)"
        for p, t in TREES.items()
        for f in functions(t)
        if f.end_lineno - f.lineno + 1 > MAX_LINES
    ]
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_each_public_name_is_defined_in_one_module():
    homes = defaultdict(list)
    for path, tree in TREES.items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                homes[node.name].append(str(path.relative_to(REPO)))
    twice = {name: files for name, files in homes.items() if len(files) > 1 and name not in ENTRY_POINTS}
    assert not twice, f"public names defined in several modules: {twice}"


def test_the_checks_see_a_planted_violation():
    planted = ast.parse("def f(a, b, c, d, e, f, g, h, i):\n" + "    x = 1\n" * 80)
    (node,) = functions(planted)
    assert parameter_count(node) == 9 and node.end_lineno - node.lineno + 1 == 81
    (method,) = functions(ast.parse("class A:\n    def m(self, a, b):\n        pass\n"))
    assert parameter_count(method) == 2
