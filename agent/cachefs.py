"""File primitives for the on-disk caches: temp names that carry the writer's pid (so a sweep can
tell an abandoned write from a live one), tree removal that never follows links and counts only
the bytes it unlinked, fsync, chunked sha256, a cheap fingerprint of a model's files, atomic JSON
writes (also relative to a directory descriptor) and inode checks.

Knows nothing of what the caches hold.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ingest.tokens import pid_alive

_READ = 8 << 20
_EDGE = 64 << 10
_OWNER = re.compile(r"\.[a-z]+-p(\d+)-")
TMP_PREFIX = ".tmp-"
_REMOVE_TRIES = 3


def temp_name(prefix: str, tag: str) -> str:
    """A unique name `<prefix>p<pid>-<tag>-<random>`; prefix is like ".tmp-"."""
    return f"{prefix}p{os.getpid()}-{tag}-{uuid.uuid4().hex[:8]}"


def owner_pid(name: str) -> int | None:
    """The writer's pid in a `temp_name`, or None for a name without one."""
    m = _OWNER.match(name)
    return int(m.group(1)) if m else None


def abandoned(path: Path, now: float, max_age: float) -> bool:
    """A temp entry left by a dead writer: its pid is gone, or (a name without a pid) it is older
    than max_age seconds."""
    pid = owner_pid(path.name)
    if pid is not None:
        return not pid_alive(pid)
    try:
        return now - os.lstat(path).st_mtime >= max_age
    except OSError:
        return False


def remove_tree(path: Path) -> int:
    """Delete path (a file, a link or a directory tree) without following any link; return the
    bytes of the regular files actually unlinked. Errors on single files are skipped."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        try:
            os.unlink(path)
        except OSError:
            return 0
        return st.st_size if stat.S_ISREG(st.st_mode) else 0
    freed = 0
    for _ in range(_REMOVE_TRIES):  # a file written into the directory meanwhile (a reader's update) is swept again
        try:
            with os.scandir(path) as it:
                children = [Path(e.path) for e in it]
        except OSError:
            children = []
        for child in children:
            freed += remove_tree(child)
        try:
            os.rmdir(path)
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:
                continue
        break
    return freed


def tree_size(path: Path) -> int:
    """Bytes of the regular files directly in directory `path` (links not followed)."""
    total = 0
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    if e.is_file(follow_symlinks=False):
                        total += e.stat(follow_symlinks=False).st_size
                except OSError:
                    continue
    except OSError:
        pass
    return total


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chunk_sha256(path: Path, chunk_bytes: int) -> list[str]:
    """The sha256 hex digests of the file's consecutive `chunk_bytes` pieces (one for an empty file).

    Pieces are hashed on up to 8 threads (hashlib and pread release the GIL), so verifying a
    large entry runs at several times the speed of one sha256 stream. `sha256sum` on the pieces
    of `split -b` gives the same digests.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
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


def fingerprint(path: Path) -> str:
    """A cheap identity of a model's files: for path (a file, or every regular file directly in a
    directory, hidden ones left out) the name, size, mtime_ns and a sha256 of the first and last
    64 KiB. Replacing any weight, config or tokenizer file changes it. Raises OSError."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            st = os.fstat(fh.fileno())
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            h.update(fh.read(_EDGE))
            if st.st_size > _EDGE:
                fh.seek(max(_EDGE, st.st_size - _EDGE))
                h.update(fh.read(_EDGE))
    return h.hexdigest()


def write_json(path: Path | str, data: dict, sync: bool, dir_fd: int | None = None) -> None:
    """Write data to path atomically (a temp file beside it, then a rename); path is relative to the
    directory dir_fd when given."""
    path = Path(path)
    tmp = path.with_name(temp_name(TMP_PREFIX, path.name))
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
        with open(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def same_inode(path: Path, st: os.stat_result) -> bool:
    """path is still the directory entry that st described (not replaced or removed since)."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def same_inode_fd(fd: int, st: os.stat_result) -> bool:
    now = os.fstat(fd)
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


def is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
