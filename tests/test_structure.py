"""The package's shape, checked from the source: no import circle (function-level imports and the
registries' module lists count), no import of another module's private name, no module over 500 lines,
and no method name compared as a string."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "frugal").rglob("*.py")):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported frugal module, names taken from it, line) for every import statement that runs, at any
    depth, plus the module strings of a registry's BUILTIN tuple."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and getattr(block.test, "id", "")
                   == "TYPE_CHECKING" for stmt in block.body for n in ast.walk(stmt)}  # never run
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("frugal")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("frugal"):
            for a in node.names:  # `from frugal.x import y` imports module frugal.x.y when there is one
                sub = f"{node.module}.{a.name}"
                out.append((sub, [], node.lineno) if sub in modules else (node.module, [a.name], node.lineno))
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "BUILTIN" for t in node.targets):
            out += [(e.value, [], node.lineno) for e in node.value.elts if isinstance(e, ast.Constant)]
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for m, p in modules.items():
        for target, _, _ in _imports(p, modules):
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target != m and target in modules:
                graph[m].add(target)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search over the explicit imports)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_private_name_imported_from_another_module():
    modules = _modules()
    bad = []
    for m, p in modules.items():
        for target, names, line in _imports(p, modules):
            bad += [f"{p.relative_to(SRC)}:{line}: {target}.{n}" for n in names if n.startswith("_")
                    and not n.startswith("__") and target != m]
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_method_name_compared_as_a_string():
    """`recipe.method == "gptq"` and the like: the registry's flags say what a method needs."""
    bad = []
    for p in _modules().values():
        for node in ast.walk(ast.parse(p.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            sides = [node.left, *node.comparators]
            named = any(isinstance(s, ast.Attribute) and s.attr == "method" or isinstance(s, ast.Name) and
                        s.id == "method" for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or isinstance(s, (ast.Tuple, ast.List))
                          for s in sides)
            if named and literal:
                bad.append(f"{p.relative_to(SRC)}:{node.lineno}")
    assert not bad, bad
