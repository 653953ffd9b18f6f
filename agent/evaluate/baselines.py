"""The baselines every config is compared with, per task: BM25 over whole files (the gold file's
rank), BM25 over function/class chunks (do the top-1 / top-3 chunks overlap the gold lines?) and a
seeded random file. A chunk that shares no term with the question is never in the top 3.

Chunks (from the packed copy's texts): every function or method with its full span, every class
header (the class line up to its first method), and per file the module-level lines outside any
top-level def or class that are not blank. Knows nothing of models or attention.
"""

from __future__ import annotations

import ast
import random
from dataclasses import dataclass

from agent.evaluate.bm25 import BM25


@dataclass(frozen=True)
class Chunk:
    path: str
    lines: frozenset[int]


def task_baselines(texts: dict[str, str], tasks, seed: int) -> dict[str, dict]:
    """task id -> {bm25_rank, bm25_fn_top1, bm25_fn_top3, random_file, gold}."""
    files = BM25(texts)
    chunks = chunks_of(texts)
    by_key = {f"{c.path}:{min(c.lines)}#{i}": c for i, c in enumerate(chunks)}
    fn = BM25({k: "\n".join(_lines(texts[c.path], c.lines)) for k, c in by_key.items()})
    paths = list(texts)
    out = {}
    for t in tasks:
        ranking = files.rank(t.question)
        scores = fn.scores(t.question)
        top = [by_key[k] for k in fn.rank(t.question)[:3] if scores[k] > 0]
        gold = set(range(t.start_line, t.end_line + 1))
        hits = [c.path == t.path and bool(c.lines & gold) for c in top]
        out[t.id] = dict(bm25_rank=ranking.index(t.path) + 1 if t.path in ranking else None,
                         bm25_fn_top1=float(hits[:1] == [True]), bm25_fn_top3=float(any(hits)),
                         random_file=random.Random(f"{seed}:random:{t.id}").choice(paths), gold=t.path)
    return out


def chunks_of(texts: dict[str, str]) -> list[Chunk]:
    """The function/class/module chunks of the Python files (others: one chunk per file)."""
    out = []
    for path, text in texts.items():
        n = text.count("\n") + 1
        try:
            tree = ast.parse(text) if path.endswith(".py") else None
        except (SyntaxError, ValueError):
            tree = None
        if tree is None:
            out.append(Chunk(path, frozenset(range(1, n + 1))))
            continue
        out += _def_chunks(path, tree)
        covered = {ln for s in tree.body if _is_def(s) for ln in range(_first(s), s.end_lineno + 1)}
        lines = text.split("\n")
        rest = frozenset(i for i in range(1, n + 1) if i not in covered and lines[i - 1].strip())
        if rest:
            out.append(Chunk(path, rest))
    return out


def _def_chunks(path: str, tree: ast.Module) -> list[Chunk]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(Chunk(path, frozenset(range(_first(node), node.end_lineno + 1))))
        elif isinstance(node, ast.ClassDef):
            first_def = next((_first(s) for s in node.body if _is_def(s)), node.end_lineno + 1)
            out.append(Chunk(path, frozenset(range(_first(node), max(first_def, node.lineno + 1)))))
    return out


def _is_def(node) -> bool:
    return isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))


def _first(node) -> int:
    return min([node.lineno] + [d.lineno for d in node.decorator_list])


def _lines(text: str, lines: frozenset[int]) -> list[str]:
    all_lines = text.split("\n")
    return [all_lines[i - 1] for i in sorted(lines) if i <= len(all_lines)]
