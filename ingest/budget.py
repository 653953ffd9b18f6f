"""Choose whole files to drop so that a pack fits a token budget.

Drop priority (first dropped first):
1. generated files, then data files, then test files (see `ingest.rules`), largest first;
2. then the least central files: fewest other files mentioning their module name (file stem, or
   the directory name for __init__.py / index.* / mod.rs / main.*), larger first on ties;
3. READMEs last, deepest first (the root README is the very last).
Files are dropped in that order until the rest fits; then dropped files are re-added, most
important first, wherever they still fit. Nothing is ever truncated.

It knows nothing about tokenizers or files on disk: it sees paths, kinds, token counts and texts.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KIND_RANK = {"generated": 0, "data": 1, "test": 2}
_DIR_NAMED = ("__init__", "index", "mod", "main", "__main__")


@dataclass(frozen=True)
class Item:
    """A droppable file: path, budget kind (rules.file_kind), section tokens, text."""

    path: str
    kind: str
    tokens: int
    text: str


def module_name(path: str) -> str:
    """The name other files would use to refer to path."""
    parts = path.split("/")
    stem = parts[-1].split(".")[0]
    if stem in _DIR_NAMED and len(parts) > 1:
        return parts[-2]
    return stem


def inbound_counts(items: list[Item]) -> dict[str, int]:
    """path -> number of other files whose text contains the path's module name as a word."""
    seen: Counter[str] = Counter()
    words = {}
    for it in items:
        words[it.path] = set(_WORD.findall(it.text))
        seen.update(words[it.path])
    out = {}
    for it in items:
        name = module_name(it.path)
        out[it.path] = seen[name] - (1 if name in words[it.path] else 0)
    return out


def drop_order(items: list[Item]) -> list[tuple[Item, str]]:
    """All items with a drop reason, in the documented drop order (first = dropped first)."""
    inbound = inbound_counts(items)

    def key(it: Item):
        if it.kind in _KIND_RANK:
            return (0, _KIND_RANK[it.kind], -it.tokens, it.path)
        if it.kind == "readme":
            return (2, -it.path.count("/"), -it.tokens, it.path)
        return (1, inbound[it.path], -it.tokens, it.path)

    out = []
    for it in sorted(items, key=key):
        if it.kind in _KIND_RANK:
            reason = f"over budget: {it.kind} file"
        elif it.kind == "readme":
            reason = "over budget: README dropped last"
        else:
            reason = f"over budget: least central ({inbound[it.path]} files mention {module_name(it.path)!r})"
        out.append((it, reason))
    return out


def choose(items: list[Item], limit: int) -> list[tuple[Item, str]]:
    """Items to drop so that the kept tokens sum to <= limit, with reasons. May drop everything."""
    total = sum(it.tokens for it in items)
    if total <= limit:
        return []
    order = drop_order(items)
    dropped = []
    for it, reason in order:
        if total <= limit:
            break
        dropped.append((it, reason))
        total -= it.tokens
    for i in range(len(dropped) - 1, -1, -1):
        it = dropped[i][0]
        if total + it.tokens <= limit:
            total += it.tokens
            dropped.pop(i)
    return dropped
