"""The cross-file task family: "which function calls X?", with the gold read from the AST.

X is a function or method defined once in the repository (packed or not: a helper imported from a
module left out of the context counts), and every call to it by name in the packed files (`X(...)`
or `obj.X(...)`, ast.Call with a Name or Attribute) sits inside one and the same function, in a
different file from X's definition. That function is the gold: its name (defined once among the
packed files, so that naming it is unambiguous) and its lines. Calls by name are counted conservatively: any call
spelled X counts, whatever object it is made on, so a common method name never qualifies. Knows
nothing of packing, models or scoring.
"""

from __future__ import annotations

import ast
from collections import Counter, defaultdict
from dataclasses import dataclass

_FUNC = (ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class Caller:
    """The one function calling `callee` (defined in callee_path); lines 1-based, inclusive."""

    callee: str
    callee_path: str
    name: str
    path: str
    line: int
    end_line: int


def caller_candidates(trees: dict[str, ast.Module], repository: dict[str, ast.Module] | None = None) -> list[Caller]:
    """Every qualifying (callee, caller) pair of the packed files `trees` (path -> parsed module), in
    path order; callees are looked up among the `repository` files (default: `trees`)."""
    repository = trees if repository is None else repository
    everywhere, defs = _defined(repository), _defined(trees)
    where = {n.name: path for path, tree in repository.items() for n in ast.walk(tree) if isinstance(n, _FUNC)}
    sites: dict[str, set] = defaultdict(set)
    for path, tree in trees.items():
        for name, fn in _calls(tree):
            sites[name].add((path, fn))
    out = []
    for callee, found in sites.items():
        if everywhere[callee] != 1 or callee not in where or callee.startswith("__") or len(found) != 1:
            continue
        ((path, fn),) = found
        if fn is None or path == where[callee] or defs[fn.name] != 1 or fn.name.startswith("__"):
            continue
        out.append(Caller(callee, where[callee], fn.name, path, fn.lineno, fn.end_lineno))
    return sorted(out, key=lambda c: (c.path, c.line, c.callee))


def _defined(trees: dict[str, ast.Module]) -> Counter:
    return Counter(n.name for tree in trees.values() for n in ast.walk(tree) if isinstance(n, (*_FUNC, ast.ClassDef)))


def _calls(tree: ast.Module) -> list[tuple[str, ast.AST | None]]:
    """(called name, innermost enclosing function or None) for every call by name in the module; a
    function's decorators and defaults belong to the scope around it, its body to it."""
    out: list[tuple[str, ast.AST | None]] = []
    stack: list[tuple[ast.AST, ast.AST | None]] = [(tree, None)]
    while stack:
        node, fn = stack.pop()
        if isinstance(node, ast.Call) and _called_name(node.func):
            out.append((_called_name(node.func), fn))
        if isinstance(node, _FUNC):
            stack += [(child, node) for child in node.body]
            stack += [(child, fn) for child in (*node.decorator_list, node.args, node.returns) if child]
        else:
            stack += [(child, fn) for child in ast.iter_child_nodes(node)]
    return out


def _called_name(func: ast.AST) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None
