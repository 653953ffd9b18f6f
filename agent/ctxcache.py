"""A persistent cache of prefilled KV tensors, keyed by model, attention config and packed content.

Each entry is a directory `<root>/<key>/` with `kv.safetensors` (the tensors; never pickle) and
`manifest.json` (format version, key, the caller's meta, created/last_used times, file size and the
sha256 of every 64 MiB piece of the safetensors file, hashed on several threads). A save writes into
a temp directory inside the root, fsyncs and renames it into place, so no reader ever sees half an
entry. A load verifies size and checksum; a corrupt entry is deleted with a one-line warning and
reported as a miss, so the caller rebuilds it. The total size is capped by least-recently-used
eviction. An unwritable root turns saving off with one warning: I/O trouble never raises out of
`save` or `load`.

Knows nothing of models, engines or cache layouts: it stores named tensors plus a JSON dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
KV_FILE = "kv.safetensors"
MANIFEST_FILE = "manifest.json"
DEFAULT_MAX_GB = 20.0
GIB = 1 << 30
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX, _TRASH_PREFIX = ".tmp-", ".trash-"
_STALE_S = 3600.0
HASH_CHUNK = 64 << 20
_READ = 8 << 20


def warn(message: str) -> None:
    """Print `moba-ask: warning: <message>` as one plain line (no markup, no colour) on stderr."""
    print(f"moba-ask: warning: {message}", file=sys.stderr, flush=True)


def default_root() -> Path:
    """`$MOBA_ASK_CACHE_DIR/contexts`, default `~/.cache/moba-ask/contexts`."""
    return Path(os.environ.get("MOBA_ASK_CACHE_DIR") or "~/.cache/moba-ask").expanduser() / "contexts"


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
        root: the cache directory. Default: `default_root()` ($MOBA_ASK_CACHE_DIR/contexts).
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
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.max_bytes = default_max_bytes() if max_bytes is None else int(max_bytes)
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self._clock = clock
        self._warned_unwritable = False

    @staticmethod
    def make_key(model: str, attention: Mapping[str, Any], content_hash: str) -> str:
        """A 64-hex-digit sha256 of the canonical JSON of (format, model, attention, content_hash).

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
        max_bytes (one warning; none when max_bytes is 0) or the root cannot be written (one warning
        per ContextCache). Raises TypeError/ValueError only for a bad key, meta or tensor.
        """
        _check_key(key)
        manifest_meta = json.loads(json.dumps(dict(meta), default=_canonical))
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        if need > self.max_bytes:
            self._warn_oversized(key, need)
            return None
        try:
            path = self._write(key, tensors, manifest_meta)
            size = _dir_size(path)
            if size > self.max_bytes:
                self._remove(path)
                self._warn_oversized(key, size)
                return None
            self._evict(keep=key, keep_size=size)
        except OSError as e:
            self._warn_unwritable(e)
            return None
        return path

    def load(
        self, key: str, device: str | torch.device = "cpu"
    ) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The (tensors, meta) saved under `key`, tensors loaded onto `device`; None on a miss.

        The file size and the sha256 of each piece are checked against the manifest (hashing runs
        on several threads, alongside the load). A corrupt, partial or mismatched entry prints
        "context cache entry <key> is corrupt; rebuilding" on stderr, is deleted, and counts as a
        miss. A hit updates last_used. On CPU the tensors are memory-mapped from the file.
        """
        path = self.path(key)
        if not path.is_dir():
            return None
        try:
            manifest = _read_manifest(path, key)
            tensors = _read_tensors(path / KV_FILE, manifest, str(device))
        except (_Corrupt, OSError, ValueError, KeyError, TypeError) as e:
            if path.exists():
                self._drop_corrupt(key, path, e)
            return None
        self._touch(path, manifest)
        return tensors, manifest["meta"]

    def entries(self) -> list[Entry]:
        """Every entry under the root, least recently used first (broken ones first of all)."""
        try:
            dirs = [d for d in self.root.iterdir() if _KEY_RE.fullmatch(d.name) and d.is_dir()]
        except OSError:
            return []
        found = [e for e in map(_entry, dirs) if e is not None]
        return sorted(found, key=lambda e: (e.ok, e.last_used or 0.0, e.key))

    def total_bytes(self) -> int:
        """Bytes on disk of all entries."""
        return sum(e.size for e in self.entries())

    def clear(self, key: str | None = None) -> int:
        """Delete entry `key` (a full key), or every entry and leftover temp directory when None.

        Returns the number of entries removed. Raises OSError when the root cannot be written.
        """
        if key is not None:
            path = self.path(key)
            return int(path.is_dir() and self._remove(path, strict=True))
        removed = sum(self._remove(e.path, strict=True) for e in self.entries())
        self._sweep(max_age=0.0)
        return removed

    def _write(self, key: str, tensors: Mapping[str, torch.Tensor], meta: dict) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep(max_age=_STALE_S)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key[:12]}-", dir=self.root))
        try:
            kv = tmp / KV_FILE
            save_file({name: t.detach().contiguous().to("cpu") for name, t in tensors.items()}, str(kv))
            _fsync(kv)
            now = self._clock()
            manifest = {"format": FORMAT_VERSION, "key": key, "created": now, "last_used": now,
                        "size": kv.stat().st_size, "checksum": _checksum(kv), "tensors": sorted(tensors),
                        "meta": meta}
            _write_json(tmp / MANIFEST_FILE, manifest, sync=True)
            _fsync(tmp)
            return self._install(tmp, self.root / key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _install(self, tmp: Path, dest: Path) -> Path:
        trash = self.root / f"{_TRASH_PREFIX}{dest.name[:12]}-{uuid.uuid4().hex[:8]}"
        if dest.exists():
            os.replace(dest, trash)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():  # a concurrent writer that won the race is fine; anything else is not
                raise
        shutil.rmtree(trash, ignore_errors=True)
        _fsync(self.root)
        return dest

    def _evict(self, keep: str, keep_size: int) -> None:
        others = [e for e in self.entries() if e.key != keep]
        total = keep_size + sum(e.size for e in others)
        for e in others:
            if total <= self.max_bytes:
                break
            if self._remove(e.path):
                total -= e.size

    def _touch(self, path: Path, manifest: dict) -> None:
        try:
            _write_json(path / MANIFEST_FILE, {**manifest, "last_used": self._clock()}, sync=False)
        except OSError:
            pass  # a read-only cache still serves hits; only the LRU order goes stale

    def _remove(self, path: Path, strict: bool = False) -> bool:
        trash = path.with_name(f"{_TRASH_PREFIX}{path.name[:12]}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(path, trash)
        except FileNotFoundError:
            return False
        except OSError:
            if strict:
                raise
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def _sweep(self, max_age: float) -> None:
        now = time.time()
        for d in self.root.glob(".*-*"):
            if d.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)) and _age(d, now) >= max_age:
                shutil.rmtree(d, ignore_errors=True)

    def _drop_corrupt(self, key: str, path: Path, error: Exception) -> None:
        warn(f"context cache entry {key} is corrupt; rebuilding ({_reason(error)})")
        self._remove(path)

    def _warn_oversized(self, key: str, size: int) -> None:
        if self.max_bytes:
            warn(f"context cache entry {key[:12]} needs {format_bytes(size)}, over the "
                 f"{format_bytes(self.max_bytes)} cache limit; not stored (raise MOBA_ASK_CACHE_MAX_GB)")

    def _warn_unwritable(self, error: OSError) -> None:
        if not self._warned_unwritable:
            self._warned_unwritable = True
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
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != key:
        raise _Corrupt("manifest does not match its entry")
    return manifest


def _read_tensors(kv: Path, manifest: dict, device: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if kv.stat().st_size != manifest["size"]:
        raise _Corrupt(f"{KV_FILE} is {kv.stat().st_size} bytes, the manifest says {manifest['size']}")
    with ThreadPoolExecutor(1) as pool:
        checksum = manifest["checksum"]
        if checksum["algorithm"] != "sha256":
            raise _Corrupt(f"unknown checksum {checksum['algorithm']!r}")
        digests = pool.submit(chunk_sha256, kv, int(checksum["chunk_bytes"]))
        try:
            tensors = load_file(str(kv), device=device)
        except SafetensorError as e:
            raise _Corrupt(str(e)) from e
        if digests.result() != checksum["chunks"]:
            raise _Corrupt("checksum mismatch")
    if sorted(tensors) != manifest["tensors"]:
        raise _Corrupt("tensor names differ from the manifest")
    return tensors


def _entry(d: Path) -> Entry | None:
    size = _dir_size(d)
    try:
        m = json.loads((d / MANIFEST_FILE).read_text())
        meta = m["meta"]
        src = meta.get("root")
        source = ", ".join(map(str, src)) if isinstance(src, list) else (None if src is None else str(src))
        return Entry(d.name, d, meta.get("model"), source, meta.get("tokens"), size,
                     float(m["created"]), float(m["last_used"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        if not d.exists():
            return None
        return Entry(d.name, d, None, None, None, size, None, None, ok=False)


def chunk_sha256(path: Path, chunk_bytes: int = HASH_CHUNK) -> list[str]:
    """The sha256 hex digests of the file's consecutive `chunk_bytes` pieces (one for an empty file).

    Pieces are hashed on up to 8 threads (hashlib and pread release the GIL), so verifying a
    large entry runs at several times the speed of one sha256 stream. `sha256sum` on the pieces
    of `split -b` gives the same digests.
    """
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            starts = range(0, max(size, 1), chunk_bytes)
            return list(pool.map(lambda s: _sha256_range(fd, s, min(chunk_bytes, size - s)), starts))
    finally:
        os.close(fd)


def _sha256_range(fd: int, start: int, length: int) -> str:
    h = hashlib.sha256()
    while length > 0:
        data = os.pread(fd, min(_READ, length), start)
        if not data:
            break
        h.update(data)
        start, length = start + len(data), length - len(data)
    return h.hexdigest()


def _checksum(path: Path) -> dict:
    return {"algorithm": "sha256", "chunk_bytes": HASH_CHUNK, "chunks": chunk_sha256(path, HASH_CHUNK)}


def _write_json(path: Path, data: dict, sync: bool) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dir_size(d: Path) -> int:
    total = 0
    try:
        for f in d.iterdir():
            try:
                total += f.stat().st_size
            except FileNotFoundError:
                continue
    except OSError:
        pass
    return total


def _age(path: Path, now: float) -> float:
    try:
        return now - path.stat().st_mtime
    except OSError:
        return 0.0


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__
