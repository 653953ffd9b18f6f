"""Data records of the ingest package: `PackOptions` (input), `FileRecord` and `Pack` (output), `PackError`.

Plain frozen dataclasses; this module knows nothing about files on disk, tokenizers or rendering.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os

    import numpy as np

    from ingest.sourcemap import SourceMap

DEFAULT_MAX_FILE_BYTES = 1 << 20
MAX_FILE_BYTES_LIMIT = 64 << 20


class PackError(ValueError):
    """A user error while packing (missing path, nothing to pack, budget too small); one-line message."""


class BudgetError(PackError):
    """The token budget cannot hold even the smallest form of any file (the message names --max-tokens)."""


@dataclass(frozen=True)
class PackOptions:
    """How to pack. Each field maps one-to-one onto a flag of `moba-ask pack`.

    Args:
        max_tokens: budget for the whole pack (tree + all file sections); None = unlimited.
            `--max-tokens N`. Default: None.
        include: gitignore-style globs; when given, only files matching one are packed.
            `--include GLOB` (repeatable). Default: ().
        exclude: gitignore-style globs of files to leave out. `--exclude GLOB` (repeatable). Default: ().
        line_numbers: prefix each line with its 1-based number (`  12| `). `--no-line-numbers`
            turns it off. Default: True.
        max_file_bytes: per-file size cap in bytes (for .ipynb/.pdf: of the extracted text), at
            most MAX_FILE_BYTES_LIMIT (64 MiB). `--max-file-bytes N`. Default: 1 MiB.
        drop: when over `max_tokens`, pack files as outlines and drop files by priority
            (`ingest.budget`); False = error instead. `--no-drop`. Default: True.
        allow_secrets: pack files that look like secrets instead of skipping them.
            `--allow-secrets`. Default: False.
        default_excludes: apply the built-in exclude list (lockfiles, vendored, build outputs, ...).
            `--no-default-excludes`. Default: True.
        notebook_outputs: include text outputs of notebook code cells. `--notebook-outputs`.
            Default: False.
        token_cache: directory of the on-disk token cache, read and written; None: no token cache.
            moba-ask passes `$MOBA_ASK_CACHE_DIR/tokens` (agent/paths.py), and None for `--no-cache`.
            Default: None.
    """

    max_tokens: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    line_numbers: bool = True
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    drop: bool = True
    allow_secrets: bool = False
    default_excludes: bool = True
    notebook_outputs: bool = False
    token_cache: str | os.PathLike | None = None

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise PackError(f"max_tokens must be positive, got {self.max_tokens}")
        if not 0 < self.max_file_bytes <= MAX_FILE_BYTES_LIMIT:
            raise PackError(f"max_file_bytes must be between 1 and {MAX_FILE_BYTES_LIMIT:,} (64 MiB), got "
                            f"{self.max_file_bytes:,}; split or exclude larger files")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass(frozen=True)
class FileRecord:
    """One packed file. `token_start:token_end` covers its whole section (header, lines, footer).

    `path` is relative to the pack root with '/' separators, control characters and backslashes
    escaped as in the rendered text (`ingest.render.display_path`); `lines` counts the file's lines
    (for notebooks and PDFs: lines of the extracted text); `flags` holds markers such as
    "non_utf8" (decoded with U+FFFD replacement), "notebook"/"pdf", "redacted" (secret values
    replaced, see `Pack.redacted`) or "outline" (only its signature lines are packed, see
    `Pack.outlined`).
    """

    path: str
    tokens: int
    token_start: int
    token_end: int
    lines: int
    bytes: int
    flags: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class Pack:
    """A packed context.

    Attributes:
        ids: int64 array [n_tokens], the concatenation of per-section encodings (no special tokens).
        text: the packed text; `ids` is its section-by-section encoding.
        files: packed files in pack order.
        skipped: (path, reason) for files left out before tokenizing (binary, secret, size, ...).
        dropped: (path, tokens, reason) for files dropped to fit `max_tokens`, in drop order.
        outlined: (path, outline tokens, full tokens, reason) for files packed as outlines to fit
            `max_tokens` (they are in `files` too, flagged "outline"), in pack order.
        redacted: (path, line, kind) for each secret value replaced by `[REDACTED:kind]` in the text.
        notes: one line per fallback that changed how files were chosen (e.g. git could not list a
            tree); callers print them on stderr.
        source_map: token index -> (path, line).
        content_hash: hex digest of ids + tokenizer identity (a context-cache key).
        root: absolute path of the pack root.
    """

    ids: np.ndarray
    text: str
    files: tuple[FileRecord, ...]
    skipped: tuple[tuple[str, str], ...]
    dropped: tuple[tuple[str, int, str], ...]
    source_map: SourceMap
    content_hash: str
    root: str
    tree_tokens: int = field(default=0)
    redacted: tuple[tuple[str, int, str], ...] = ()
    notes: tuple[str, ...] = ()
    outlined: tuple[tuple[str, int, int, str], ...] = ()

    @property
    def total_tokens(self) -> int:
        return int(len(self.ids))
