"""Outlines: the line numbers of a file's signatures, for files packed in outline when over budget.

An outline is a sorted list of 1-based line numbers of the file's text (lines split at "\\n", as
`ingest.render` numbers them); the pack shows exactly those lines with their real numbers.

- Python (`.py`, `.pyi`), through `ast`: decorators, class and function headers (multi-line
  signatures whole), the first line of each docstring, UPPER_CASE constants at module and class
  level, annotated class fields; classes are entered, function bodies are not, and defs under
  module-level `if`/`try`/`with` are found. A file `ast` cannot parse (syntax error, too deep) is
  outlined by a line scan (`def`, `class`, `@` lines) and the reason says so.
- JavaScript, TypeScript/TSX, Go, Rust, Java, C, C++ and Ruby, through tree-sitter (its grammar
  packages): each definition from its first line to the line that opens its body; containers
  (classes, impls, namespaces, modules) are entered, function bodies are not.
- Markdown: its headings (outside code fences).
Any other file has no outline (`NoOutline` says why); the budget then drops it whole.

It knows nothing about tokens, budgets or rendering.
"""

from __future__ import annotations

import ast
import importlib
import re
from dataclasses import dataclass
from functools import cache

try:
    import tree_sitter
except ImportError:  # a broken install: outlines for Python and Markdown still work
    tree_sitter = None

_CONST = re.compile(r"[A-Z][A-Z0-9_]*$")
_SCAN = re.compile(r"\s*(?:@|(?:async\s+)?def\s|class\s)")
_HEADING = re.compile(r" {0,3}#{1,6}(?:\s|$)")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_QUOTES_ONLY = re.compile(r"""\s*[rRbBuUfF]*("{3}|'{3}|"|')\s*$""")

_TS_LANGUAGES = {
    "js": ("javascript", "tree_sitter_javascript", "language"),
    "mjs": ("javascript", "tree_sitter_javascript", "language"),
    "cjs": ("javascript", "tree_sitter_javascript", "language"),
    "jsx": ("javascript", "tree_sitter_javascript", "language"),
    "ts": ("typescript", "tree_sitter_typescript", "language_typescript"),
    "mts": ("typescript", "tree_sitter_typescript", "language_typescript"),
    "cts": ("typescript", "tree_sitter_typescript", "language_typescript"),
    "tsx": ("tsx", "tree_sitter_typescript", "language_tsx"),
    "go": ("go", "tree_sitter_go", "language"),
    "rs": ("rust", "tree_sitter_rust", "language"),
    "java": ("java", "tree_sitter_java", "language"),
    "c": ("c", "tree_sitter_c", "language"),
    "h": ("c", "tree_sitter_c", "language"),
    "cc": ("cpp", "tree_sitter_cpp", "language"),
    "cpp": ("cpp", "tree_sitter_cpp", "language"),
    "cxx": ("cpp", "tree_sitter_cpp", "language"),
    "hpp": ("cpp", "tree_sitter_cpp", "language"),
    "hh": ("cpp", "tree_sitter_cpp", "language"),
    "hxx": ("cpp", "tree_sitter_cpp", "language"),
    "rb": ("ruby", "tree_sitter_ruby", "language"),
}
# definitions whose body is code: shown up to the body, never entered
_TS_FUNCTIONS = frozenset({
    "function_declaration", "generator_function_declaration", "method_definition", "function_expression",
    "arrow_function", "function_item", "method_declaration", "constructor_declaration",
    "function_definition", "method", "singleton_method",
})
# definitions that hold other definitions: shown up to the body, then entered
_TS_CONTAINERS = frozenset({
    "class_declaration", "abstract_class_declaration", "interface_declaration", "enum_declaration",
    "record_declaration", "annotation_type_declaration", "internal_module", "module", "class",
    "impl_item", "trait_item", "mod_item", "class_specifier", "struct_specifier", "namespace_definition",
    "struct_item", "enum_item", "union_item",
})
# one-line definitions without a body worth showing
_TS_SIGNATURES = frozenset({
    "type_alias_declaration", "method_signature", "abstract_method_signature", "function_signature_item",
    "type_declaration", "type_item", "const_item", "static_item", "macro_definition", "type_definition",
    "enum_specifier", "union_specifier",
})
# plain nodes whose children may be definitions
_TS_WRAPPERS = frozenset({
    "program", "source_file", "translation_unit", "export_statement", "class_body", "declaration_list",
    "field_declaration_list", "interface_body", "body_statement", "template_declaration",
    "linkage_specification", "preproc_if", "preproc_ifdef", "preproc_else", "preproc_elif",
    "ambient_declaration",
})
_TS_VARIABLES = frozenset({"lexical_declaration", "variable_declaration"})


class NoOutline(Exception):
    """The file has no outline; str(e) says why (no parser for its type, no definitions found)."""


@dataclass(frozen=True)
class Outline:
    """1-based line numbers to show (sorted, unique) and how they were found."""

    lines: tuple[int, ...]
    how: str


def outline(rel: str, text: str) -> Outline:
    """The outline of `text` (the file at pack path `rel`). Raises NoOutline."""
    name = rel.rsplit("/", 1)[-1]
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in ("py", "pyi"):
        found = _python(text)
    elif ext in ("md", "markdown"):
        found = Outline(_markdown(text), "markdown headings")
    elif ext in _TS_LANGUAGES:
        found = _tree_sitter(ext, text)
    else:
        raise NoOutline(f"no outline parser for .{ext} files" if ext else "no outline parser for this file type")
    if not found.lines:
        raise NoOutline("no definitions to outline")
    return found


def _python(text: str) -> Outline:
    try:
        tree = ast.parse(text)
        lines = _py_body(tree.body, text.split("\n"), in_class=False)
        return Outline(tuple(sorted(lines)), "python ast")
    except SyntaxError as e:
        why = f"syntax error at line {e.lineno}" if e.lineno else "syntax error"
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; nesting too deep for ast
        why = type(e).__name__
    scan = [i for i, line in enumerate(text.split("\n"), 1) if _SCAN.match(line)]
    return Outline(tuple(scan), f"line scan ({why})")


def _py_body(body: list[ast.stmt], src: list[str], in_class: bool) -> set[int]:
    out: set[int] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out |= _py_def(node, src)
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for part in ("body", "orelse", "finalbody"):
                out |= _py_body(getattr(node, part, []), src, in_class)
            for handler in getattr(node, "handlers", []):
                out |= _py_body(handler.body, src, in_class)
        elif isinstance(node, ast.AnnAssign) and in_class:
            out.add(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)) and _is_constant(node):
            out.add(node.lineno)
    return out


def _py_def(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, src: list[str]) -> set[int]:
    out: set[int] = set()
    for d in node.decorator_list:
        out.update(range(d.lineno, d.end_lineno + 1))
    first = node.body[0]
    end = max(node.lineno, first.lineno - 1)
    while end > node.lineno and (not src[end - 1].strip() or src[end - 1].lstrip().startswith("#")):
        end -= 1
    out.update(range(node.lineno, end + 1))
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        out.add(first.lineno)
        if _QUOTES_ONLY.match(src[first.lineno - 1]) and first.end_lineno > first.lineno:
            out.add(first.lineno + 1)
    if isinstance(node, ast.ClassDef):
        out |= _py_body(node.body, src, in_class=True)
    return out


def _is_constant(node: ast.Assign | ast.AnnAssign) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return all(isinstance(t, ast.Name) and _CONST.match(t.id) for t in targets)


def _markdown(text: str) -> tuple[int, ...]:
    out, fence = [], None
    for i, line in enumerate(text.split("\n"), 1):
        m = _FENCE.match(line)
        if m:
            fence = None if fence == m.group(1) else (fence or m.group(1))
        elif fence is None and _HEADING.match(line):
            out.append(i)
    return tuple(out)


@cache
def _parser(ext: str):
    """(language name, tree_sitter.Parser or None when the grammar package is missing)."""
    name, module, function = _TS_LANGUAGES[ext]
    if tree_sitter is None:
        return name, None
    try:
        grammar = getattr(importlib.import_module(module), function)()
    except ImportError:
        return name, None
    return name, tree_sitter.Parser(tree_sitter.Language(grammar))


def _tree_sitter(ext: str, text: str) -> Outline:
    name, parser = _parser(ext)
    if parser is None:
        raise NoOutline(f"no outline parser for .{ext} files (the tree-sitter {name} grammar is not installed)")
    root = parser.parse(text.encode("utf-8", "replace")).root_node
    rows: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        kind = node.type
        if kind in _TS_FUNCTIONS or kind in _TS_CONTAINERS:
            rows.update(_header_rows(node, node.child_by_field_name("body")))
        elif kind in _TS_SIGNATURES:
            rows.add(node.start_point[0])
        elif kind in _TS_VARIABLES:
            rows.update(_variable_rows(node))
        if kind in _TS_CONTAINERS or kind in _TS_WRAPPERS:
            stack.extend(reversed(node.named_children))
    return Outline(tuple(sorted(r + 1 for r in rows)), f"tree-sitter {name}")


def _header_rows(node, body) -> range:
    """Rows from the definition's first row to the row that opens its body (the first row alone
    without a body; the row before the body when the body opens with a statement, as in Ruby)."""
    start = node.start_point[0]
    if body is None:
        return range(start, start + 1)
    end = body.start_point[0]
    if body.text[:1] not in (b"{", b":") and end > start:
        end -= 1
    return range(start, max(start, end) + 1)


def _variable_rows(node) -> range:
    """`const f = (x) => {...}` and `var C = class {...}`: the header up to the value's body."""
    for decl in node.named_children:
        value = decl.child_by_field_name("value")
        if value is not None and value.type in ("arrow_function", "function_expression", "function", "class"):
            return _header_rows(node, value.child_by_field_name("body"))
    return range(0)
