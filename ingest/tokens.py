"""Tokenizer adapter and the on-disk token cache.

`Encoder` wraps a Hugging Face fast tokenizer (transformers `PreTrainedTokenizerFast` /
`TokenizersBackend`) or a `tokenizers.Tokenizer`. It encodes sections in batches on a private copy
of the backend with no post-processor, padding or truncation, and with `encode_special_tokens` on,
so that text such as "<|im_end|>" inside a file is encoded as plain text, never as a control
token. Each section's ids are returned with *marks*: the index of the first token starting at or
after each given character offset (from the tokenizer's own offsets; no re-tokenizing). A section
longer than CHUNK_CHARS is encoded in pieces of at most that many characters, cut after a line
break (else after a space, else anywhere), and pieces are encoded at most BATCH_CHARS at a time,
so one huge file cannot make the tokenizer's working memory explode; such sections get their own
cache keys.

`TokenCache` stores (ids, marks) per section under `<directory>/<tokenizer id>/` (the caller names the
directory: moba-ask passes `$MOBA_ASK_CACHE_DIR/tokens`), keyed by a hash of the section text. Files are a small binary
format with a checksum (never pickle), written atomically (temp file named with the writer's pid +
rename); a corrupt entry is ignored and rewritten. The whole token cache (every tokenizer) is capped
at TOKEN_CACHE_MAX_BYTES: a write that passes the cap deletes the least recently used entries
(a hit refreshes an entry's mtime) down to TRIM_TO of it. `usage` and `clear` serve `moba-ask
cache`; neither touches a temp file whose writer is alive. It knows nothing about files on disk
or the pack layout.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np

MAGIC = b"MBTK"
VERSION = 1
_HEAD = struct.Struct("<4sHII")
_IDENTITIES: dict[int, tuple[object, str]] = {}
TOKEN_CACHE_MAX_BYTES = 1 << 30
TRIM_TO = 0.8
_TMP_PREFIX = ".tmp-"
_OWNER = re.compile(r"\.tmp-p(\d+)-")
CHUNK_CHARS = 1 << 18
BATCH_CHARS = 1 << 20


def backend_of(tokenizer):
    """The `tokenizers.Tokenizer` behind tokenizer. Raises TypeError for anything else."""
    import tokenizers

    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer or a transformers fast tokenizer, got "
                    f"{type(tokenizer).__name__}; load it with use_fast=True")


def identity(tokenizer) -> str:
    """Stable hex id of the tokenizer's full definition (vocab, merges, normalizers, ...)."""
    hit = _IDENTITIES.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    digest = hashlib.blake2b(backend_of(tokenizer).to_str().encode(), digest_size=16).hexdigest()
    if len(_IDENTITIES) > 8:
        _IDENTITIES.clear()
    _IDENTITIES[id(tokenizer)] = (tokenizer, digest)
    return digest


class Encoder:
    """Batch encoder with exact per-character marks. See module doc."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.identity = identity(tokenizer)
        self._plain = None

    def _backend(self):
        if self._plain is None:
            import tokenizers

            plain = tokenizers.Tokenizer.from_str(backend_of(self.tokenizer).to_str())
            plain.post_processor = None
            plain.no_padding()
            plain.no_truncation()
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def encode(self, texts: list[str], cuts: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Encode texts. Returns (ids uint32 [n], marks uint32 [len(cuts[i])]) per text.

        marks[j] is the index of the first token whose start offset is >= cuts[i][j].
        """
        pieces = [(i, start, piece) for i, t in enumerate(texts) for start, piece in split(t)]
        ids: list[list[np.ndarray]] = [[] for _ in texts]
        starts: list[list[np.ndarray]] = [[] for _ in texts]
        for group in _groups(pieces):
            encs = self._backend().encode_batch([p for _, _, p in group], add_special_tokens=False)
            for (i, offset, _), enc in zip(group, encs, strict=True):
                ids[i].append(np.array(enc.ids, dtype=np.uint32))
                starts[i].append(np.fromiter((s for s, _ in enc.offsets), np.int64, len(enc.ids)) + offset)
        out = []
        for i, cut in enumerate(cuts):
            tok = np.concatenate(ids[i]) if ids[i] else np.zeros(0, np.uint32)
            pos = np.concatenate(starts[i]) if starts[i] else np.zeros(0, np.int64)
            if len(pos) > 1:
                np.maximum.accumulate(pos, out=pos)
            out.append((tok, np.searchsorted(pos, np.asarray(cut, np.int64)).astype(np.uint32)))
        return out


def split(text: str, limit: int | None = None) -> list[tuple[int, str]]:
    """(start offset, piece) covering text, each piece at most limit (default CHUNK_CHARS) characters."""
    limit = limit or CHUNK_CHARS
    if len(text) <= limit:
        return [(0, text)]
    out, pos = [], 0
    while pos < len(text):
        end = min(pos + limit, len(text))
        if end < len(text):
            cut = text.rfind("\n", pos + limit // 2, end)
            cut = cut if cut >= 0 else text.rfind(" ", pos + limit // 2, end)
            end = cut + 1 if cut >= 0 else end
        out.append((pos, text[pos:end]))
        pos = end
    return out


def _groups(pieces: list) -> list[list]:
    groups, cur, size = [], [], 0
    for p in pieces:
        if cur and size + len(p[2]) > BATCH_CHARS:
            groups.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += len(p[2])
    return groups + ([cur] if cur else [])


def section_key(text: str, extra: str) -> str:
    """Cache key of a section: hash of its text plus layout facts (`extra`)."""
    chunked = f"|chunks of {CHUNK_CHARS}" if len(text) > CHUNK_CHARS else ""
    h = hashlib.blake2b((extra + chunked).encode(), digest_size=20)
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class TokenCache:
    """(ids, marks) per section key on disk; `directory=None` disables it. See module doc.

    max_bytes caps the whole cache under `directory`, every tokenizer together.
    """

    def __init__(self, directory: Path | None, tokenizer_id: str, writable: bool = True,
                 max_bytes: int = TOKEN_CACHE_MAX_BYTES):
        self.base = None if directory is None else Path(directory)
        self.dir = None if directory is None else self.base / tokenizer_id[:24]
        self.writable = writable
        self.max_bytes = max_bytes
        self._total: int | None = None

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.bin"

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Cached (ids, marks), or None when absent or corrupt. A hit refreshes the entry's mtime."""
        if self.dir is None:
            return None
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        got = _decode(data)
        if got is not None and self.writable:
            try:
                os.utime(path)
            except OSError:
                pass  # a read-only cache still serves hits
        return got

    def put(self, key: str, ids: np.ndarray, marks: np.ndarray) -> None:
        """Store atomically, then trim the cache if it passed max_bytes; I/O errors are ignored
        (the cache is an optimisation)."""
        if self.dir is None or not self.writable:
            return
        path = self._path(key)
        body = _HEAD.pack(MAGIC, VERSION, len(ids), len(marks)) + ids.astype("<u4").tobytes() \
            + marks.astype("<u4").tobytes()
        body += hashlib.blake2b(body, digest_size=16).digest()
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_TMP_PREFIX}p{os.getpid()}-")
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return
        if self._total is None:
            self._total = usage(self.base)[1]
        else:
            self._total += len(body)
        if self._total > self.max_bytes:
            self._total = _trim(self.base, int(self.max_bytes * TRIM_TO))


def usage(directory: Path) -> tuple[int, int]:
    """(entries, bytes) of the token cache under directory (0, 0 when absent)."""
    found = _entries(directory)
    return len(found), sum(size for _, size, _ in found)


def clear(directory: Path) -> tuple[int, int]:
    """Delete every token cache entry and abandoned temp file under directory; return (entries,
    bytes) removed. Temp files of live writers stay. Links are never followed."""
    found = _entries(directory)
    removed = freed = 0
    for path, size, _ in found:
        if _unlink(path):
            removed, freed = removed + 1, freed + size
    _sweep(directory)
    return removed, freed


def _trim(directory: Path, target: int) -> int:
    """Delete least recently used entries until at most target bytes remain; return what remains."""
    found = sorted(_entries(directory), key=lambda e: e[2])
    total = sum(size for _, size, _ in found)
    for path, size, _ in found:
        if total <= target:
            break
        if _unlink(path):
            total -= size
    _sweep(directory)
    return total


def _entries(directory: Path) -> list[tuple[Path, int, float]]:
    """(path, size, mtime) of every entry file under directory/<tokenizer>/<shard>/, links skipped."""
    out = []
    for path in _files(directory):
        if path.suffix == ".bin":
            try:
                st = path.lstat()
            except OSError:
                continue
            out.append((path, st.st_size, st.st_mtime))
    return out


def _files(directory: Path) -> list[Path]:
    """Regular files two levels below directory (no links followed)."""
    out = []
    for tok in _scan(directory, dirs=True):
        for shard in _scan(tok, dirs=True):
            out.extend(_scan(shard, dirs=False))
    return out


def _scan(directory: Path, dirs: bool) -> list[Path]:
    try:
        with os.scandir(directory) as it:
            return [Path(e.path) for e in it
                    if (e.is_dir(follow_symlinks=False) if dirs else e.is_file(follow_symlinks=False))]
    except OSError:
        return []


def _sweep(directory: Path) -> None:
    """Remove temp files whose writer (the pid in the name) is dead."""
    for path in _files(directory):
        m = _OWNER.match(path.name)
        if m and not pid_alive(int(m.group(1))):
            _unlink(path)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (ours included): its temp files are not abandoned."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except OSError:
        return False
    return True


def _decode(data: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    if len(data) < _HEAD.size + 16 or hashlib.blake2b(data[:-16], digest_size=16).digest() != data[-16:]:
        return None
    magic, version, n_ids, n_marks = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) != _HEAD.size + 4 * (n_ids + n_marks) + 16:
        return None
    ids = np.frombuffer(data, "<u4", n_ids, _HEAD.size)
    marks = np.frombuffer(data, "<u4", n_marks, _HEAD.size + 4 * n_ids)
    return ids, marks
