"""The task builder: RepoQA-style "find the function" needles and "where is X defined" tasks from a
Python repository, spread evenly through one packed context.

How a workspace is built (`build_workspace`):
1. the repository is packed whole (`ingest.pack`), and files are taken in pack order while they
   fit the budget (a file that does not fit is skipped, later smaller ones may still go in), so
   that the context is a run of neighbouring files, as a reader of the repository sees them;
2. needle functions are chosen among the chosen Python files (ast): a unique name, a docstring of
   at least `MIN_DOC_WORDS` words on lines of its own whose first line occurs nowhere else in the
   repository, a body beyond the docstring, at most `MAX_FN_CHARS` characters of code; one per
   equal slice of the token range the candidates span (seeded choice inside a slice);
3. the chosen files are copied to a temp directory (the user's tree is never written), the needle
   docstrings are deleted there, and the copy is packed: that pack is the context;
4. the second family (a class or a module-level UPPER_CASE constant with a unique name, gold = the
   definition line) and the third ("which function calls X?", gold = the one calling function in
   another file, from the AST: `callers`; X may be defined outside the context) are chosen on the
   copy the same way.
The mix is about half needles, a quarter definitions, a quarter callers; a family short of
candidates is made up by definitions, then callers. Gold lines and depths refer to the packed copy.
Knows nothing of models or attention.
"""

from __future__ import annotations

import ast
import os
import random
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import ingest
from agent import paths
from agent.evaluate.callers import caller_candidates

FUNCTION, CLASS, CONSTANT, CALLER = "function", "class", "constant", "caller"
KINDS = (FUNCTION, CLASS, CONSTANT, CALLER)
MIN_DOC_WORDS = 6
MAX_DOC_WORDS = 120
MAX_FN_CHARS = 2000
FN_QUESTION = ("Which function does this, and in which file? {doc}\n"
               "Name the function and its file as path:line, then repeat the function in a ``` code block.")
DEF_QUESTION = "In which file and line is the {kind} {name} defined?"
CALL_QUESTION = "Which function calls `{callee}`? Name the calling function and its file as path:line."
_CONSTANT = re.compile(r"^_*[A-Z][A-Z0-9_]{2,}$")


@dataclass(frozen=True)
class Task:
    """One question with its gold answer in the packed copy.

    kind: "function", "class", "constant" or "caller" (name: the calling function). start_line/end_line:
    1-based, inclusive (a definition task has one line). depth: token position of the gold's first
    line / pack tokens, in [0, 1]. code: the gold source (the function without its docstring, the
    definition line, or the calling function).
    """

    id: str
    kind: str
    name: str
    path: str
    start_line: int
    end_line: int
    question: str
    depth: float
    code: str


@dataclass(frozen=True)
class Workspace:
    """The packed copy, its tasks, and the text of every packed file (path -> text)."""

    pack: ingest.Pack
    tasks: tuple[Task, ...]
    texts: dict[str, str]
    source_root: str


@dataclass(frozen=True)
class _Cand:
    kind: str
    name: str
    path: str
    line: int
    end_line: int
    doc: str = ""
    doc_lines: tuple[int, int] = (0, 0)


class TaskError(ValueError):
    """No tasks can be built (no Python files, no docstrings...); the message names the fix."""


def build_workspace(root: str, tokenizer, *, context_tokens: int, n_tasks: int, seed: int,
                    include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> Workspace:
    """Pack files of `root` within about `context_tokens`, choose `n_tasks` tasks (seeded), return the workspace.

    About half the tasks are function needles, a quarter class/constant definitions and a quarter
    callers (n_tasks=1: one needle); definitions, then callers make up for missing ones. Fewer are
    returned when the repository has fewer candidates.

    Raises:
        TaskError: nothing to ask about, or no file fits. ingest.PackError: the path cannot be packed.
    """
    full = ingest.pack(root, tokenizer, ingest.PackOptions(include=include, exclude=exclude, token_cache=paths.tokens_dir()))
    chosen = _fit_in_order(full, context_tokens)
    if not chosen:
        raise TaskError(f"--context-tokens {context_tokens:,} is too small for any file under {root}; raise it")
    cands = _function_cands(_python_texts(full.root, chosen), full.text)
    needles = _spread(cands, n_tasks - 2 * (n_tasks // 4), _positions(full, chosen), random.Random(f"{seed}:fn"))
    pack, copy_texts = _repack(full.root, chosen, needles, tokenizer)
    parsed = _parseable(copy_texts)
    pos = partial(_token_pos, pack)
    n_defs = n_tasks - len(needles) - n_tasks // 4
    defs = _spread(_definition_cands(parsed), n_defs, pos, random.Random(f"{seed}:def"))
    repository = _python_texts(full.root, full.files)
    callers = _spread(_caller_cands(parsed, repository), n_tasks - len(needles) - len(defs), pos,
                      random.Random(f"{seed}:call"))
    tasks = [t for t in (_function_task(c, copy_texts, pack) for c in needles) if t]
    tasks += [_definition_task(c, copy_texts, pack) for c in defs + callers if c.path in copy_texts]
    if not tasks:
        raise TaskError(f"no Python functions with docstrings or unique classes/constants under {root}; "
                        "eval needs a Python repository (check --include/--exclude and --context-tokens)")
    tasks.sort(key=lambda t: t.depth)
    return Workspace(pack, tuple(_numbered(tasks)), copy_texts, full.root)


def _repack(root: str, chosen: list[ingest.FileRecord], needles: list[_Cand], tokenizer):
    """(pack, path -> text) of a temp copy of the chosen files without the needle docstrings."""
    with tempfile.TemporaryDirectory(prefix="moba-ask-eval-") as tmp:
        copy_root = os.path.join(tmp, os.path.basename(root.rstrip(os.sep)) or "repo")
        _copy(root, chosen, copy_root, needles)
        pack = ingest.pack(copy_root, tokenizer, ingest.PackOptions(token_cache=paths.tokens_dir()))
        texts = {f.path: Path(copy_root, f.path).read_text("utf-8", errors="replace").replace("\r\n", "\n")
                 for f in pack.files}
    return pack, texts


def _fit_in_order(full: ingest.Pack, budget: int) -> list[ingest.FileRecord]:
    """Files in pack order, each kept when it still fits the budget (the full tree's tokens reserved)."""
    room, used, out = budget - full.tree_tokens, 0, []
    for f in full.files:
        if used + f.tokens <= room:
            out.append(f)
            used += f.tokens
    return out


def _positions(full: ingest.Pack, chosen: list[ingest.FileRecord]):
    """pos(path, line): the line's token offset in the chosen files laid end to end."""
    offset, at = {}, 0
    for f in chosen:
        offset[f.path] = at - f.token_start
        at += f.tokens
    return lambda path, line: offset[path] + _token_pos(full, path, line)


def _python_texts(root: str, files: list[ingest.FileRecord]) -> dict[str, tuple[str, ast.Module]]:
    out = {}
    for f in files:
        if f.path.endswith(".py") and not f.flags:
            out[f.path] = Path(root, f.path).read_text("utf-8", errors="replace").replace("\r\n", "\n")
    return _parseable(out)


def _parseable(texts: dict[str, str]) -> dict[str, tuple[str, ast.Module]]:
    out = {}
    for path, text in texts.items():
        if not path.endswith(".py"):
            continue
        try:
            out[path] = (text, ast.parse(text))
        except (SyntaxError, ValueError):
            continue
    return out


def _function_cands(texts: dict[str, tuple[str, ast.Module]], pack_text: str) -> list[_Cand]:
    names = Counter(n.name for _, tree in texts.values() for n in ast.walk(tree) if _is_def(n))
    out = []
    for path, (text, tree) in texts.items():
        lines = text.split("\n")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and names[node.name] == 1:
                cand = _needle(path, node, lines)
                if cand and pack_text.count(cand.doc_first) <= 1:
                    out.append(cand.cand)
    return out


@dataclass(frozen=True)
class _Needle:
    cand: _Cand
    doc_first: str


def _needle(path: str, node, lines: list[str]) -> _Needle | None:
    """A needle candidate when the function's docstring can be cut out cleanly, else None."""
    if node.name.startswith("__") or len(node.body) < 2 or not _is_docstring(node.body[0]):
        return None
    doc_node, nxt = node.body[0], node.body[1]
    first, last = doc_node.lineno, doc_node.end_lineno
    own_lines = (first > node.lineno and nxt.lineno > last
                 and not lines[first - 1][: doc_node.col_offset].strip()
                 and not lines[last - 1][doc_node.end_col_offset:].strip())
    doc = ast.get_docstring(node) or ""
    code = "\n".join(lines[node.lineno - 1: first - 1] + lines[last: node.end_lineno])
    first_line = next((ln.strip() for ln in doc.split("\n") if ln.strip()), "")
    if not own_lines or len(doc.split()) < MIN_DOC_WORDS or len(code) > MAX_FN_CHARS or len(first_line) < 8:
        return None
    return _Needle(_Cand(FUNCTION, node.name, path, node.lineno, node.end_lineno, doc, (first, last)), first_line)


def _is_docstring(stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _is_def(node) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


def _definition_cands(texts: dict[str, tuple[str, ast.Module]]) -> list[_Cand]:
    names = Counter(n.name for _, tree in texts.values() for n in ast.walk(tree) if _is_def(n))
    consts = Counter(name for _, tree in texts.values() for name, _ in _module_constants(tree))
    out = []
    for path, (_, tree) in texts.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and names[node.name] == 1 and node.name not in consts:
                out.append(_Cand(CLASS, node.name, path, node.lineno, node.lineno))
        for name, line in _module_constants(tree):
            if consts[name] == 1 and names[name] == 0:
                out.append(_Cand(CONSTANT, name, path, line, line))
    return out


def _caller_cands(texts: dict[str, tuple[str, ast.Module]], repository: dict[str, tuple[str, ast.Module]]
                  ) -> list[_Cand]:
    found = caller_candidates({path: tree for path, (_, tree) in texts.items()},
                              {path: tree for path, (_, tree) in repository.items()})
    return [_Cand(CALLER, c.name, c.path, c.line, c.end_line, doc=c.callee) for c in found]


def _module_constants(tree: ast.Module) -> list[tuple[str, int]]:
    out = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
            target = stmt.target
        else:
            continue
        if isinstance(target, ast.Name) and _CONSTANT.match(target.id):
            out.append((target.id, stmt.lineno))
    return out


def _spread(cands: list[_Cand], n: int, pos, rng: random.Random) -> list[_Cand]:
    """n candidates, one per equal slice of the token range they span (seeded pick inside a slice;
    an empty slice takes the unused candidate nearest its centre)."""
    placed = sorted(((pos(c.path, c.line), c) for c in cands), key=lambda x: (x[0], x[1].path))
    if n <= 0 or not placed:
        return []
    lo, hi = placed[0][0], placed[-1][0] + 1
    used: set[int] = set()
    for i in range(min(n, len(placed))):
        a, b = lo + (hi - lo) * i / n, lo + (hi - lo) * (i + 1) / n
        inside = [j for j, (p, _) in enumerate(placed) if a <= p < b and j not in used]
        if inside:
            used.add(rng.choice(inside))
        else:
            centre = (a + b) / 2
            used.add(min((j for j in range(len(placed)) if j not in used), key=lambda j: abs(placed[j][0] - centre)))
    return [placed[j][1] for j in sorted(used)]


def _token_pos(pack: ingest.Pack, path: str, line: int) -> int:
    return pack.source_map.line_tokens(path, line)[0]


def _copy(root: str, files: list[ingest.FileRecord], dest: str, needles: list[_Cand]) -> None:
    """Copy the chosen files to dest, deleting the needle docstrings."""
    cut: dict[str, list[tuple[int, int]]] = {}
    for c in needles:
        cut.setdefault(c.path, []).append(c.doc_lines)
    for f in files:
        target = Path(dest, f.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.path not in cut:
            shutil.copyfile(Path(root, f.path), target)
            continue
        lines = Path(root, f.path).read_text("utf-8").replace("\r\n", "\n").split("\n")
        for first, last in sorted(cut[f.path], reverse=True):
            del lines[first - 1: last]
        target.write_text("\n".join(lines), encoding="utf-8")


def _function_task(c: _Cand, texts: dict[str, str], pack: ingest.Pack) -> Task | None:
    if c.path not in texts:
        return None
    text = texts[c.path]
    node = next((n for n in ast.walk(ast.parse(text))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == c.name), None)
    if node is None:
        return None
    code = "\n".join(text.split("\n")[node.lineno - 1: node.end_lineno])
    question = FN_QUESTION.format(doc=question_text(c.doc, c.name))
    return Task("", FUNCTION, c.name, c.path, node.lineno, node.end_lineno, question,
                _depth(pack, c.path, node.lineno), code)


def _definition_task(c: _Cand, texts: dict[str, str], pack: ingest.Pack) -> Task:
    """A class/constant definition task, or a caller task (the callee's name is in `doc`)."""
    code = "\n".join(texts[c.path].split("\n")[c.line - 1: c.end_line])
    if c.kind == CALLER:
        question = CALL_QUESTION.format(callee=c.doc)
    else:
        question = DEF_QUESTION.format(kind=c.kind, name=c.name)
    return Task("", c.kind, c.name, c.path, c.line, c.end_line, question, _depth(pack, c.path, c.line), code)


def question_text(doc: str, name: str) -> str:
    """The docstring as a question: the function's own name masked, at most MAX_DOC_WORDS words,
    paragraphs kept whole where possible, whitespace inside a paragraph collapsed."""
    doc = re.sub(rf"(?<!\w){re.escape(name)}(?!\w)", "this function", doc)
    out, words = [], 0
    for para in re.split(r"\n\s*\n", doc.strip()):
        tokens = para.split()
        if words and words + len(tokens) > MAX_DOC_WORDS:
            break
        out.append(" ".join(tokens[: MAX_DOC_WORDS - words]))
        words += len(tokens)
    return "\n".join(out)


def _depth(pack: ingest.Pack, path: str, line: int) -> float:
    return round(_token_pos(pack, path, line) / max(pack.total_tokens, 1), 4)


def _numbered(tasks: list[Task]) -> list[Task]:
    prefix = {FUNCTION: "fn", CLASS: "cls", CONSTANT: "const", CALLER: "call"}
    return [replace(t, id=f"{i + 1:02d}-{prefix[t.kind]}") for i, t in enumerate(tasks)]
