"""Choose, for a pack over its token budget, which files go in whole, which as outlines, which not at all.

Algorithm (each file has a full text and, where `ingest.outline` can make one, a smaller outline):
1. every file starts in its smallest form (its outline, else its full text);
2. while that is over the budget, drop files in drop order (below);
3. re-add dropped files, most important first, in their smallest form wherever it still fits;
4. upgrade outlined files to their full text, most important first, wherever the difference fits.
So a file is dropped only when even the outlines of everything more important fill the budget, and
the budget is never exceeded. Nothing is ever cut mid-file.

Drop order (first dropped first; "most important" is the reverse):
1. generated files, data files, licences, tests (see `ingest.rules.file_kind`), in that order,
   larger first;
2. docs, nested READMEs included: deeper first, then larger first;
3. source and everything else, least central first: fewest other files mentioning their module
   name (file stem, or the directory name for __init__.py / index.* / mod.rs / main.*), larger
   first on ties;
4. the top-level README last.

It knows nothing about tokenizers or files on disk: it sees paths, kinds, token counts and texts.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KIND_RANK = {"generated": 0, "data": 1, "licence": 2, "test": 3}
_LABEL = {"generated": "generated file", "data": "data file", "licence": "licence", "test": "test file",
          "doc": "doc", "readme": "top-level README"}
_DIR_NAMED = ("__init__", "index", "mod", "main", "__main__")
FULL, OUTLINE, DROP = "full", "outline", "drop"


@dataclass(frozen=True)
class Item:
    """A file: path, budget kind (rules.file_kind), full section tokens, text, and its outline's
    tokens (None: no outline) with a note saying how the outline was made or why there is none."""

    path: str
    kind: str
    tokens: int
    text: str
    outline_tokens: int | None = None
    outline_note: str = ""

    @property
    def smallest(self) -> int:
        return self.tokens if self.outline_tokens is None else min(self.tokens, self.outline_tokens)


@dataclass(frozen=True)
class Choice:
    """What happens to one item: FULL, OUTLINE or DROP, with the reason (empty for FULL)."""

    item: Item
    form: str
    reason: str = ""


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
    """All items with their budget label, in the documented drop order (first = dropped first)."""
    inbound = inbound_counts(items)

    def key(it: Item):
        if it.kind in _KIND_RANK:
            return (0, _KIND_RANK[it.kind], 0, -it.tokens, it.path)
        if it.kind == "doc":
            return (1, 0, -it.path.count("/"), -it.tokens, it.path)
        if it.kind == "readme":
            return (3, 0, 0, -it.tokens, it.path)
        return (2, inbound[it.path], 0, -it.tokens, it.path)

    out = []
    for it in sorted(items, key=key):
        label = _LABEL.get(it.kind) or f"least central ({inbound[it.path]} files mention {module_name(it.path)!r})"
        out.append((it, label))
    return out


def plan(items: list[Item], limit: int) -> list[Choice]:
    """One Choice per item (drop order) so that the chosen forms sum to <= limit. May drop everything."""
    order = drop_order(items)
    form = {it.path: OUTLINE if it.smallest < it.tokens else FULL for it, _ in order}
    total = sum(it.smallest for it, _ in order)
    dropped = []
    for it, _ in order:
        if total <= limit:
            break
        form[it.path] = DROP
        total -= it.smallest
        dropped.append(it)
    for it in reversed(dropped):
        if total + it.smallest <= limit:
            form[it.path] = OUTLINE if it.smallest < it.tokens else FULL
            total += it.smallest
    for it, _ in reversed(order):
        grow = it.tokens - it.smallest
        if form[it.path] == OUTLINE and total + grow <= limit:
            form[it.path] = FULL
            total += grow
    return [Choice(it, form[it.path], _reason(it, label, form[it.path])) for it, label in order]


def _reason(it: Item, label: str, form: str) -> str:
    if form == FULL:
        return ""
    if form == OUTLINE:
        return f"over budget: {label}; outline by {it.outline_note}"
    if it.outline_tokens is None:
        return f"over budget: {label}; {it.outline_note or 'no outline'}"
    return f"over budget: {label}; its outline did not fit either"
