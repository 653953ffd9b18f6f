"""A persistent cache of prefilled KV tensors, keyed by model, attention config and packed content.

Each entry is a directory `<root>/<key>/` with `kv.safetensors` (the tensors; never pickle) and
`manifest.json` (format version, key, the caller's meta, created/last_used times, file size and the
sha256 of every 64 MiB piece of the safetensors file, hashed on several threads). A save writes into
a temp directory inside the root named with the writer's pid, fsyncs and renames it into place, so
no reader ever sees half an entry and racing writers of one key each install a whole one. Temp
directories whose writer is dead are swept when a cache is opened, saved to or cleared; a live
writer's are never touched. A load verifies size and checksum; only verified corruption (checksum,
size or manifest mismatch, missing file, a link inside the entry) deletes an entry, with a one-line
warning, and counts as a miss; any other read error (permissions, EIO) is a miss that keeps the
entry. Nothing in the cache is followed through a symbolic link, so no entry reads or deletes
anything outside the root. The total size is capped by least-recently-used eviction. A failing
save (unwritable root, full disk) warns once and returns None: I/O trouble never raises out of
`save` or `load`.

Knows nothing of models, engines or cache layouts: it stores named tensors plus a JSON dict.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import paths
from agent.cachefs import (
    TMP_PREFIX,
    abandoned,
    chunk_sha256,
    fsync,
    is_real_dir,
    remove_tree,
    same_inode,
    same_inode_fd,
    temp_name,
    tree_size,
    write_json,
)

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
KV_FILE = "kv.safetensors"
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_GB = 20.0
GIB = 1 << 30
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TRASH_PREFIX = ".trash-"
_STALE_S = 3600.0
HASH_CHUNK = 64 << 20
_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"os error (\d+)")


def warn(message: str) -> None:
    """Print `moba-ask: warning: <message>` as one plain line (no markup, no colour) on stderr."""
    print(f"moba-ask: warning: {message}", file=sys.stderr, flush=True)


def default_max_bytes() -> int:
    """`$MOBA_ASK_CACHE_MAX_GB` (GiB, float, 0 turns saving off) in bytes; default 20 GiB.

    Raises:
        ValueError: the variable is not a finite number >= 0.
    """
    raw = os.environ.get("MOBA_ASK_CACHE_MAX_GB", "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * GIB)
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        raise ValueError(
            f"MOBA_ASK_CACHE_MAX_GB must be a size in GiB >= 0, got {raw!r}; e.g. MOBA_ASK_CACHE_MAX_GB=50"
        )
    return int(gb * GIB)


def format_bytes(n: int | float) -> str:
    """Binary units: 512 B, 3.0 KiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class Entry:
    """One cached context, as `ContextCache.entries()` lists it.

    `model`, `source` (the packed path(s), meta["root"]) and `tokens` come from the caller's meta and
    are None when absent. `ok` is False when the manifest is missing or unreadable: loading such an
    entry deletes it. `size` is the bytes on disk; times are Unix seconds (None when not ok).
    """

    key: str
    path: Path
    model: str | None
    source: str | None
    tokens: int | None
    size: int
    created: float | None
    last_used: float | None
    ok: bool = True


class _Corrupt(Exception):
    """An entry whose files do not match its manifest."""


class ContextCache:
    """Saved prefilled contexts under one root directory, capped in size with LRU eviction.

    Args:
        root: the cache directory. Default: `agent.paths.contexts_dir()` ($MOBA_ASK_CACHE_DIR/contexts).
        max_bytes: the most bytes all entries may take; 0 stores nothing. Default:
            `default_max_bytes()` ($MOBA_ASK_CACHE_MAX_GB, else 20 GiB).
        clock: the time source for created/last_used (tests pass a fake). Default: time.time.

    Raises:
        ValueError: max_bytes < 0, or a bad $MOBA_ASK_CACHE_MAX_GB.

    >>> cache = ContextCache()
    >>> key = ContextCache.make_key("smollm2-135m", {"attention": "moba", "block_size": 512}, sha)
    >>> hit = cache.load(key, device="cuda")  # None on a miss, else (tensors, meta)
    """

    def __init__(self, root: Path | str | None = None, max_bytes: int | None = None,
                 clock: Callable[[], float] = time.time):
        self.root = Path(root).expanduser() if root is not None else paths.contexts_dir()
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._clock = clock
        self._warned_unsaved = False
        self._sweep()

    @staticmethod
    def make_key(model: str | Mapping[str, Any], attention: Mapping[str, Any], content_hash: str) -> str:
        """A 64-hex-digit sha256 of the canonical JSON of (format, model, attention, content_hash).

        model is a name or, better, a dict of the model's identity (name, weight fingerprint,
        tokenizer id).
        attention holds every setting that changes the KV values (kind, block size, top-k, sinks,
        dense layers, dtype, ...); key order does not matter, values do (2 and 2.0 differ). Sets
        are sorted; torch dtypes, devices and paths become their str(). Raises TypeError on other
        values JSON cannot hold.
        """
        payload = {"format": FORMAT_VERSION, "model": model, "attention": dict(attention),
                   "content": content_hash}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_canonical)
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key: str) -> Path:
        """The directory of entry `key` (which may not exist)."""
        _check_key(key)
        return self.root / key

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path | None:
        """Store `tensors` (any device/dtype; written contiguous from CPU) and `meta` under `key`.

        meta must be JSON-serialisable (paths, sets and torch dtypes are converted as in make_key);
        by convention it holds "model", "root" (the packed path or paths) and "tokens", which
        `entries()` shows. An existing entry is replaced. Then evicts the
        least recently used other entries until the total fits `max_bytes`.

        Returns the entry directory, or None when nothing was stored: the entry alone exceeds
        max_bytes (one warning; none when max_bytes is 0) or writing failed (unwritable root, full
        disk, the temp directory removed under it: one warning per ContextCache, the temp directory
        removed). Raises TypeError/ValueError only for a bad key, meta or tensor.
        """
        _check_key(key)
        manifest_meta = json.loads(json.dumps(dict(meta), default=_canonical))
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        if need > self.max_bytes:
            self._warn_oversized(key, need)
            return None
        try:
            path = self._write(key, tensors, manifest_meta)
            size = tree_size(path)
            if size > self.max_bytes:
                self._remove(path)
                self._warn_oversized(key, size)
                return None
            self._evict(keep=key, keep_size=size)
        except OSError as e:
            self._warn_unsaved(e)
            return None
        return path

    def load(
        self, key: str, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The (tensors, meta) saved under `key`, tensors loaded onto `device`; None on a miss.

        The file size and the sha256 of each piece are checked against the manifest (hashing runs
        on several threads, alongside the load). A corrupt, partial or mismatched entry prints
        "context cache entry <key> is corrupt; rebuilding" on stderr, is deleted, and counts as a
        miss. An entry that cannot be read (permissions, I/O error) or is a symbolic link is a miss
        with one warning and is kept. An entry replaced while it was read is a plain miss. A hit
        updates last_used. On CPU the tensors are memory-mapped from the file.
        """
        path = self.path(key)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            return self._unreadable(key, e)
        if stat.S_ISLNK(st.st_mode):
            warn(f"context cache entry {key} is a symbolic link; ignored (the cache never follows links)")
            return None
        try:
            if not stat.S_ISDIR(st.st_mode):
                raise _Corrupt("not a directory")
            manifest = _read_manifest(path, key)
            tensors = _read_tensors(path / KV_FILE, manifest, str(device))
        except (_Corrupt, FileNotFoundError, ValueError, KeyError, TypeError) as e:
            if same_inode(path, st):
                self._drop_corrupt(key, path, e)
            return None
        except OSError as e:
            return self._unreadable(key, e)
        if not same_inode(path, st):
            return None
        self._touch(path, manifest, st)
        return tensors, manifest["meta"]

    def drop(self, key: str, reason: str) -> None:
        """Delete entry `key` as unusable, with the one-line corrupt warning (e.g. the caller found
        its tensors do not fit the context)."""
        self._drop_corrupt(key, self.path(key), _Corrupt(reason))

    def entries(self) -> list[Entry]:
        """Every entry under the root, least recently used first (broken ones first of all).
        Symbolic links are not entries."""
        try:
            with os.scandir(self.root) as it:
                dirs = [Path(d.path) for d in it if _KEY_RE.fullmatch(d.name) and d.is_dir(follow_symlinks=False)]
        except OSError:
            return []
        found = [e for e in map(_entry, dirs) if e is not None]
        return sorted(found, key=lambda e: (e.ok, e.last_used or 0.0, e.key))

    def total_bytes(self) -> int:
        """Bytes on disk of all entries."""
        return sum(e.size for e in self.entries())

    def clear(self, key: str | None = None) -> tuple[int, int]:
        """Delete entry `key` (a full key), or every entry, stray link and abandoned temp directory
        when None. Temp directories of live writers are left alone.

        Returns (entries removed, bytes of regular files unlinked). Raises OSError when the root
        cannot be written.
        """
        if key is not None:
            freed = self._remove(self.path(key), strict=True)
            return (0, 0) if freed is None else (1, freed)
        removed = freed = 0
        for e in self.entries():
            got = self._remove(e.path, strict=True)
            if got is not None:
                removed, freed = removed + 1, freed + got
        for link in self._stray_links():
            remove_tree(link)
        self._sweep()
        return removed, freed

    def _write(self, key: str, tensors: Mapping[str, torch.Tensor], meta: dict) -> Path:
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()
        tmp = self.root / temp_name(TMP_PREFIX, key[:12])
        tmp.mkdir()
        try:
            kv = tmp / KV_FILE
            try:
                save_file({name: t.detach().contiguous().to("cpu") for name, t in tensors.items()}, str(kv))
            except SafetensorError as e:
                raise _as_os_error(e) from e
            fsync(kv)
            now = self._clock()
            manifest = {"format": FORMAT_VERSION, "key": key, "created": now, "last_used": now,
                        "size": kv.stat().st_size, "checksum": _checksum(kv), "tensors": sorted(tensors),
                        "meta": meta}
            write_json(tmp / MANIFEST_FILE, manifest, sync=True)
            fsync(tmp)
            return self._install(tmp, self.root / key)
        finally:
            remove_tree(tmp)

    def _install(self, tmp: Path, dest: Path) -> Path:
        trash = self.root / temp_name(_TRASH_PREFIX, dest.name[:12])
        if os.path.lexists(dest):
            try:
                os.replace(dest, trash)
            except FileNotFoundError:
                pass  # a concurrent writer moved the old entry aside first
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_real_dir(dest):  # a concurrent writer that won the race is fine; anything else is not
                raise
        remove_tree(trash)
        fsync(self.root)
        return dest

    def _evict(self, keep: str, keep_size: int) -> None:
        others = [e for e in self.entries() if e.key != keep]
        total = keep_size + sum(e.size for e in others)
        for e in others:
            if total <= self.max_bytes:
                break
            if self._remove(e.path) is not None:
                total -= e.size

    def _touch(self, path: Path, manifest: dict, st: os.stat_result) -> None:
        """Update last_used in the very directory that was read (through its descriptor), so that a
        save replacing the entry meanwhile never receives the old manifest."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if same_inode_fd(fd, st):
                write_json(MANIFEST_FILE, {**manifest, "last_used": self._clock()}, sync=False, dir_fd=fd)
        except OSError:
            pass  # a read-only cache still serves hits; only the LRU order goes stale
        finally:
            os.close(fd)

    def _remove(self, path: Path, strict: bool = False) -> int | None:
        """Move path aside and delete it without following links; the bytes freed, None if absent."""
        trash = self.root / temp_name(_TRASH_PREFIX, path.name[:12])
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return None
        except OSError:
            if strict:
                raise
            return None
        return remove_tree(trash)

    def _stray_links(self) -> list[Path]:
        try:
            with os.scandir(self.root) as it:
                return [Path(d.path) for d in it if _KEY_RE.fullmatch(d.name) and d.is_symlink()]
        except OSError:
            return []

    def _sweep(self) -> None:
        """Remove temp and trash directories whose writer is dead (see cachefs.abandoned)."""
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        now = time.time()
        for name in names:
            d = self.root / name
            if name.startswith((TMP_PREFIX, _TRASH_PREFIX)) and abandoned(d, now, _STALE_S):
                remove_tree(d)

    def _drop_corrupt(self, key: str, path: Path, error: Exception) -> None:
        warn(f"context cache entry {key} is corrupt; rebuilding ({_reason(error)})")
        self._remove(path)

    def _unreadable(self, key: str, error: OSError) -> None:
        warn(f"context cache entry {key[:12]} cannot be read ({_reason(error)}); prefilling instead, "
             "the entry is kept (check the permissions of the cache directory)")
        return None

    def _warn_oversized(self, key: str, size: int) -> None:
        if self.max_bytes:
            warn(f"context cache entry {key[:12]} needs {format_bytes(size)}, over the "
                 f"{format_bytes(self.max_bytes)} cache limit; not stored (raise MOBA_ASK_CACHE_MAX_GB)")

    def _warn_unsaved(self, error: OSError) -> None:
        if self._warned_unsaved:
            return
        self._warned_unsaved = True
        if error.errno in _FULL:
            warn(f"context cache {self.root} is full ({_reason(error)}); this context was not saved "
                 "(free space, lower MOBA_ASK_CACHE_MAX_GB or set MOBA_ASK_CACHE_DIR elsewhere)")
        else:
            warn(f"context cache {self.root} is not writable ({_reason(error)}); contexts will not be "
                 "saved (set MOBA_ASK_CACHE_DIR to a writable directory)")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"context cache keys are 64 lowercase hex digits from ContextCache.make_key, got {key!r}"
        )


def _canonical(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path) or type(value).__module__ == "torch":
        return str(value)
    raise TypeError(f"cannot put {type(value).__name__} {value!r} into a context cache key")


def _read_manifest(path: Path, key: str) -> dict:
    try:
        fd = os.open(path / MANIFEST_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Corrupt(f"{MANIFEST_FILE} is a symbolic link") from e
        raise
    with os.fdopen(fd, "rb") as f:
        manifest = json.loads(f.read())
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION or manifest.get("key") != key:
        raise _Corrupt("manifest does not match its entry")
    return manifest


def _read_tensors(kv: Path, manifest: dict, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    st = os.lstat(kv)
    if not stat.S_ISREG(st.st_mode):
        raise _Corrupt(f"{KV_FILE} is not a regular file")
    if st.st_size != manifest["size"]:
        raise _Corrupt(f"{KV_FILE} is {st.st_size} bytes, the manifest says {manifest['size']}")
    checksum = manifest["checksum"]
    if checksum["algorithm"] != "sha256":
        raise _Corrupt(f"unknown checksum {checksum['algorithm']!r}")
    with ThreadPoolExecutor(1) as pool:
        digests = pool.submit(chunk_sha256, kv, int(checksum["chunk_bytes"]))
        try:
            tensors = load_file(str(kv), device=device)
        except SafetensorError as e:
            digests.result()  # a read error (OSError) wins over "corrupt"
            raise _Corrupt(str(e)) from e
        if digests.result() != checksum["chunks"]:
            raise _Corrupt("checksum mismatch")
    if sorted(tensors) != manifest["tensors"]:
        raise _Corrupt("tensor names differ from the manifest")
    return tensors


def _entry(d: Path) -> Entry | None:
    size = tree_size(d)
    try:
        m = _read_manifest(d, d.name)
        meta = m["meta"]
        src = meta.get("root")
        source = ", ".join(map(str, src)) if isinstance(src, list) else (None if src is None else str(src))
        return Entry(d.name, d, meta.get("model"), source, meta.get("tokens"), size,
                     float(m["created"]), float(m["last_used"]))
    except (_Corrupt, OSError, ValueError, KeyError, TypeError, AttributeError):
        if not d.exists():
            return None
        return Entry(d.name, d, None, None, None, size, None, None, ok=False)


def _checksum(path: Path) -> dict:
    return {"algorithm": "sha256", "chunk_bytes": HASH_CHUNK, "chunks": chunk_sha256(path, HASH_CHUNK)}


def _as_os_error(error: Exception) -> OSError:
    """safetensors reports I/O failures as SafetensorError("... (os error 28)"); recover the errno."""
    m = _OS_ERROR.search(str(error))
    code = int(m.group(1)) if m else errno.EIO
    return OSError(code, os.strerror(code))


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__
