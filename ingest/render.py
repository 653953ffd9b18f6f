"""Render the packed text: pack order, the tree section, and one section per file.

Layout of a pack:

    Packed repository NAME: N files. Each file is in <file path="..." lines="N"> ... </file>, ...
    <tree>
    README.md
    src/
      app.py
    </tree>

    <file path="README.md" lines="2">
    1| # Title
    2| text
    </file>

A file packed as an outline (`outline_section`) shows only its signature lines, each with its real
number whatever `line_numbers` says, in `<file path="..." lines="N" outline="signatures only">`,
and is listed as `path (outline)` in the tree. Line numbers are right-aligned to the file's widest
number and followed by "| ". Large trees
collapse to directories with file counts. Order (deterministic): READMEs (shallowest first), then
other docs, then everything else; within a group, files of a directory come before its
subdirectories, names compared case-insensitively.

File names are shown through `display_path`: backslashes and control characters (C0, DEL, C1,
line/paragraph separators, bidi overrides, undecodable bytes as surrogates) are escaped as `\\\\`, `\\n`, `\\x1b`,
`\\u202e`, so a name can neither forge lines of the pack nor drive a terminal. It knows nothing about
tokens or files on disk.
"""

from __future__ import annotations

import re
from collections import defaultdict
from itertools import accumulate

from ingest import rules

RENDER_VERSION = 1
TREE_MAX_ENTRIES = 256
_UNSAFE = re.compile("[\\\\\x00-\x1f\x7f-\x9f\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_path(name: str) -> str:
    """name with backslashes and control characters escaped (undecodable bytes as \\udcNN); injective."""
    return _UNSAFE.sub(_escape, name) if _UNSAFE.search(name) else name


def _escape(m: re.Match) -> str:
    c = m.group(0)
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def order_key(rel: str) -> tuple:
    """Sort key implementing the documented pack order."""
    parts = rel.split("/")
    dirs, name = tuple(p.casefold() for p in parts[:-1]), parts[-1]
    if name.lower().startswith("readme"):
        group = 0
    elif rules.is_doc(rel):
        group = 1
    else:
        group = 2
    if group == 0:
        return (0, len(dirs), dirs, name.casefold(), rel)
    return (group, 0, dirs, name.casefold(), rel)


def file_section(rel: str, text: str, line_numbers: bool) -> tuple[str, list[int], int]:
    """(section text, char offset where each line starts, footer start offset).

    The section is header + numbered lines + footer. Line count = number of "\\n"-separated lines
    (a final newline does not start a new line; an empty file has 0 lines).
    """
    lines = _lines(text)
    n = len(lines)
    header = f'<file path="{_attr(rel)}" lines="{n}">\n'
    if line_numbers:
        w = len(str(n))
        body = [f"{i:>{w}}| {line}\n" if line else f"{i:>{w}}|\n" for i, line in enumerate(lines, 1)]
    else:
        body = [line + "\n" for line in lines]
    starts = list(accumulate(map(len, body), initial=len(header)))
    footer = starts.pop()
    return header + "".join(body) + "</file>\n\n", starts, footer


def outline_section(rel: str, text: str, shown: tuple[int, ...]) -> tuple[str, list[int], int]:
    """Like `file_section` for an outline: only the lines numbered in `shown` (sorted, 1-based),
    each prefixed with its real number; the header still gives the file's full line count."""
    lines = _lines(text)
    n = len(lines)
    header = f'<file path="{_attr(rel)}" lines="{n}" outline="signatures only">\n'
    w = len(str(n))
    body = [f"{i:>{w}}| {lines[i - 1]}\n" if lines[i - 1] else f"{i:>{w}}|\n" for i in shown]
    starts = list(accumulate(map(len, body), initial=len(header)))
    footer = starts.pop()
    return header + "".join(body) + "</file>\n\n", starts, footer


def line_count(text: str) -> int:
    """The number of lines `file_section` shows for text."""
    return len(_lines(text))


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _attr(rel: str) -> str:
    return rel.replace("&", "&amp;").replace('"', "&quot;")


def tree_section(root_name: str, rels: list[str], line_numbers: bool,
                 outlined: frozenset[str] = frozenset()) -> str:
    """The preamble and <tree> of the included files (collapsed to directories when large); files
    in `outlined` are marked "(outline)"."""
    numbered = ", each line prefixed with its number" if line_numbers else ""
    head = (f"Packed repository {root_name}: {len(rels)} files. Each file is in "
            f'<file path="..." lines="N"> ... </file>{numbered}.\n')
    if outlined:
        head += "Files marked (outline) show only their signature lines.\n"
    return head + "<tree>\n" + "".join(_tree_lines(rels, outlined)) + "</tree>\n\n"


def _tree_lines(rels: list[str], outlined: frozenset[str]) -> list[str]:
    paths = sorted(rels, key=lambda r: (tuple(p.casefold() for p in r.split("/")[:-1]), r.casefold()))
    if len(paths) <= TREE_MAX_ENTRIES:
        return _full_tree(paths, outlined)
    return _dir_tree(paths)


def _full_tree(paths: list[str], outlined: frozenset[str]) -> list[str]:
    out, shown = [], ()
    for p in paths:
        parts = p.split("/")
        dirs = tuple(parts[:-1])
        common = 0
        while common < min(len(dirs), len(shown)) and dirs[common] == shown[common]:
            common += 1
        out += [f"{'  ' * d}{dirs[d]}/\n" for d in range(common, len(dirs))]
        mark = " (outline)" if p in outlined else ""
        out.append(f"{'  ' * len(dirs)}{parts[-1]}{mark}\n")
        shown = dirs
    return out


def _dir_tree(paths: list[str]) -> list[str]:
    direct: dict[tuple, int] = defaultdict(int)
    total: dict[tuple, int] = defaultdict(int)
    children: dict[tuple, int] = defaultdict(int)
    for p in paths:
        dirs = tuple(p.split("/")[:-1])
        direct[dirs] += 1
        for d in range(len(dirs) + 1):
            if dirs[:d] not in total and d:
                children[dirs[:d - 1]] += 1
            total[dirs[:d]] += 1
    per_depth = defaultdict(int)
    for k in total:
        per_depth[len(k)] += 1
    depth, shown = 1, per_depth[1]
    while per_depth[depth + 1] and shown + per_depth[depth + 1] <= TREE_MAX_ENTRIES:
        depth += 1
        shown += per_depth[depth]
    out = [f"({direct[()]} files at the top level)\n"] if direct[()] else []
    for key in sorted((k for k in total if 0 < len(k) <= depth), key=lambda k: [s.casefold() for s in k]):
        if children[key] and len(key) == depth:
            note = f"{total[key]} files in subtree"
        else:
            note = f"{direct[key]} file" + ("" if direct[key] == 1 else "s")
        out.append(f"{'  ' * (len(key) - 1)}{key[-1]}/ ({note})\n")
    return out
