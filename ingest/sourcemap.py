"""`SourceMap`: token index -> (path, line) for a packed context, via sorted arrays and binary search.

A map is a sorted array of *marks*: the token index where each file header, each file line and each
file footer starts, plus one mark per non-file section (the tree) and an end sentinel. A token
belongs to the last mark starting at or before it, so memory is O(files + lines), not O(tokens).

Conventions:
- Lines are 1-based. A token belongs to the line on which its first character lies (a token such
  as "\\n    " that spans a line break belongs to the line it starts on).
- Tokens of a file's header and footer map to (path, 0). Tokens of the tree, of anything outside
  the pack (after `shifted`) or past its end map to None.
- A line may own no tokens (an empty line whose "\\n" merged into the previous token); then
  `line_tokens` returns an empty range and `has` is still True.
- A file packed as an outline has marks only for the lines it shows, each carrying its real line
  number; `has` and `line_tokens` know only those lines, `span_lines` reports real numbers.

It knows nothing about files, tokenizers or rendering; `ingest.pack` builds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class SourceMap:
    """Sorted marks over token indices.

    Attributes:
        starts: int64 [n_marks], non-decreasing token index where each mark begins.
        file_idx: int32 [n_marks], index into `paths`, or -1 for no file (tree, end sentinel).
        line: int32 [n_marks], 1-based line number, 0 for a file header/footer.
        paths: file paths, pack order.
        first_mark: int64 [n_files], index of each file's header mark.
        n_lines: int32 [n_files], number of line marks of each file: its line count, or for an
            outline the number of lines shown.
    """

    starts: np.ndarray
    file_idx: np.ndarray
    line: np.ndarray
    paths: tuple[str, ...]
    first_mark: np.ndarray
    n_lines: np.ndarray

    @classmethod
    def from_sections(cls, sections: Sequence[tuple[str | None, int, np.ndarray, int | Sequence[int]]],
                      total: int):
        """Build from (path or None, section token start, marks relative to it, lines) in order.

        `lines` is the line count n (lines 1..n are shown), or for an outline the increasing real
        line numbers of the lines shown. For a file, marks are [header, one per line, footer];
        for a non-file section, [0]. `total` is the token count of the whole pack (end sentinel).
        """
        starts, fidx, lines, paths, first, n_lines = [], [], [], [], [], []
        offset = 0
        for path, start, marks, n in sections:
            starts.append(np.asarray(marks, dtype=np.int64) + start)
            if path is None:
                fidx.append(np.full(len(marks), -1, np.int32))
                lines.append(np.zeros(len(marks), np.int32))
            else:
                fidx.append(np.full(len(marks), len(paths), np.int32))
                shown = np.arange(1, n + 1) if isinstance(n, (int, np.integer)) else np.asarray(n)
                lines.append(np.concatenate([[0], shown, [0]]).astype(np.int32))
                paths.append(path)
                first.append(offset)
                n_lines.append(len(shown))
            offset += len(marks)
        starts.append(np.array([total], np.int64))
        fidx.append(np.array([-1], np.int32))
        lines.append(np.array([0], np.int32))
        return cls(np.concatenate(starts), np.concatenate(fidx), np.concatenate(lines), tuple(paths),
                   np.array(first, np.int64), np.array(n_lines, np.int32))

    def __post_init__(self):
        object.__setattr__(self, "_index", {p: i for i, p in enumerate(self.paths)})

    @property
    def total(self) -> int:
        """Token index one past the pack's last token (in this map's coordinates)."""
        return int(self.starts[-1])

    def locate(self, token_index: int) -> tuple[str, int] | None:
        """(path, line) of one token; line 0 for a file header/footer; None outside any file.

        >>> sm.locate(120)
        ('src/app.py', 7)
        """
        i = int(np.searchsorted(self.starts, token_index, side="right")) - 1
        if i < 0 or self.file_idx[i] < 0:
            return None
        return self.paths[self.file_idx[i]], int(self.line[i])

    def locate_array(self, token_indices) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised `locate`: (file index into `paths` or -1, line) arrays, same shape as the input."""
        i = np.searchsorted(self.starts, np.asarray(token_indices), side="right") - 1
        ok = i >= 0
        i = np.where(ok, i, 0)
        return np.where(ok, self.file_idx[i], -1), np.where(ok, self.line[i], 0)

    def span_lines(self, tok_start: int, tok_end: int) -> list[tuple[str, int, int]]:
        """Files and line ranges touched by tokens [tok_start, tok_end), in pack order.

        Returns [(path, first_line, last_line)]; header/footer and tree tokens add nothing.
        """
        if tok_end <= tok_start:
            return []
        i0 = max(int(np.searchsorted(self.starts, tok_start, side="right")) - 1, 0)
        i1 = int(np.searchsorted(self.starts, tok_end, side="left")) - 1
        f, ln = self.file_idx[i0:i1 + 1], self.line[i0:i1 + 1]
        keep = (f >= 0) & (ln > 0)
        f, ln = f[keep], ln[keep]
        if len(f) == 0:
            return []
        runs = np.concatenate([[0], np.flatnonzero(np.diff(f)) + 1])
        lo, hi = np.minimum.reduceat(ln, runs), np.maximum.reduceat(ln, runs)
        return [(self.paths[f[r]], int(a), int(b)) for r, a, b in zip(runs, lo, hi)]

    def line_tokens(self, path: str, line: int) -> tuple[int, int]:
        """Token range [start, end) of one line (possibly empty). Raises KeyError for an unknown path:line."""
        m = self._line_mark(path, line)
        if m is None:
            raise KeyError(f"{path}:{line} is not in this pack")
        return int(self.starts[m]), int(self.starts[m + 1])

    def file_tokens(self, path: str) -> tuple[int, int]:
        """Token range [start, end) of a file's whole section (header to footer). Raises KeyError."""
        f = self._index[path]
        m = int(self.first_mark[f])
        return int(self.starts[m]), int(self.starts[m + int(self.n_lines[f]) + 2])

    def has(self, path: str, line: int) -> bool:
        """True when `path` is packed and shows `line` (1 <= line <= its line count; for an outline,
        one of the lines shown)."""
        return self._line_mark(path, line) is not None

    def _line_mark(self, path: str, line: int) -> int | None:
        f = self._index.get(path)
        if f is None or line < 1:
            return None
        lo = int(self.first_mark[f]) + 1
        shown = self.line[lo:lo + int(self.n_lines[f])]
        k = int(np.searchsorted(shown, line))
        return lo + k if k < len(shown) and shown[k] == line else None

    def shifted(self, offset: int) -> SourceMap:
        """The same map for the pack embedded at token `offset` of a longer sequence.

        Tokens before `offset` then map to None, as do tokens after the pack.
        """
        return SourceMap(self.starts + offset, self.file_idx, self.line, self.paths, self.first_mark,
                         self.n_lines)
