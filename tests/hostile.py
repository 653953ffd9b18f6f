"""Hostile inputs planted for tests/test_battery.py: the World a row runs in (a repository, a directory
outside it, a private cache), setups that plant special files, links, hostile names and git configs,
damages to a context cache entry (entry dir with kv.safetensors and manifest.json), small tmpfs
mounts, and a process's resident memory.

Knows nothing of the CLI or of what outcome a row expects.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.fakes import FakeRuntime
from tests.ingest.fixtures import git_repo, write_tree


@dataclasses.dataclass
class World:
    """A repository, a directory outside it holding a secret, a private cache and the fake runtime."""

    tmp: Path
    repo: Path
    outside: Path
    cache: Path
    tokenizer: Path
    rt: FakeRuntime
    mounts: list[Path] = dataclasses.field(default_factory=list)
    ggufs: dict[str, Path] = dataclasses.field(default_factory=dict)
    sock: socket.socket | None = None

    def entries(self) -> list[Path]:
        root = self.cache / "contexts"
        return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def fifo(rel: str) -> Callable[[World], None]:
    return lambda w: os.mkfifo(w.repo / rel)


def link(rel: str, target: str) -> Callable[[World], None]:
    def make(w: World) -> None:
        (w.repo / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.format(repo=w.repo, outside=w.outside), w.repo / rel)
    return make


def files(**tree: str | bytes) -> Callable[[World], None]:
    return lambda w: write_tree(w.repo, {k.replace("__", "/"): v for k, v in tree.items()})


def bind_socket(w: World) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(w.repo / "agent.sock"))
    w.sock = s


def sparse(rel: str, size: int) -> Callable[[World], None]:
    def make(w: World) -> None:
        with open(w.repo / rel, "wb") as f:
            f.truncate(size)
    return make


def hostile_git(w: World) -> None:
    git_repo(w.repo, commit=["src/settings.py"])
    marker = w.tmp / "pwned"
    with open(w.repo / ".git" / "config", "a") as f:
        f.write(f"[core]\n\tfsmonitor = touch {marker}; false\n")


def flip_byte(entry: Path, w: World) -> None:
    kv = entry / "kv.safetensors"
    data = bytearray(kv.read_bytes())
    data[-3] ^= 0xFF
    kv.write_bytes(bytes(data))


def edit_manifest(**changes) -> Callable[[Path, World], None]:
    def edit(entry: Path, w: World) -> None:
        m = json.loads((entry / "manifest.json").read_text())
        for key, value in changes.items():
            if key == "tokens":
                m["meta"]["tokens"] = value
            else:
                m[key] = value
        (entry / "manifest.json").write_text(json.dumps(m))
    return edit


def short_kv_valid_checksum(entry: Path, w: World) -> None:
    """A whole, checksummed entry that holds fewer tokens than the context (a poisoned restore)."""
    from safetensors.torch import load_file

    from agent.ctxcache import ContextCache

    key = entry.name
    tensors = {k: v[: max(1, v.shape[0] // 2)] for k, v in load_file(entry / "kv.safetensors").items()}
    meta = json.loads((entry / "manifest.json").read_text())["meta"]
    ContextCache().save(key, tensors, meta)


def relink(name: str) -> Callable[[Path, World], None]:
    """Move entry/name outside the cache and leave a link to it in its place."""
    def move(entry: Path, w: World) -> None:
        target = w.outside / f"moved-{name}"
        os.replace(entry / name, target)
        os.symlink(target, entry / name)
    return move


def entry_linked_outside(entry: Path, w: World) -> None:
    target = w.outside / "entry"
    os.replace(entry, target)
    os.symlink(target, entry)


def stray_temp(entry: Path, w: World) -> None:
    tmp = entry.parent / ".tmp-999999999-dead"
    tmp.mkdir()
    (tmp / "kv.safetensors").write_bytes(b"\0" * (1 << 20))
    os.utime(tmp, (0, 0))


def write_text(name: str, text: str) -> Callable[[Path, World], None]:
    return lambda entry, w: (entry / name).write_text(text)


def tmpfs(options: str, fill: bool = False) -> Callable[[World], None]:
    """Mount a small tmpfs as the cache dir (unmounted by the world fixture); fill: leave it full."""
    def make(w: World) -> None:
        w.cache.mkdir()
        opts = options.replace("ro,", "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(w.cache)], capture_output=True)
        if done.returncode:
            pytest.skip(f"mount refused ({done.stderr.decode().strip()}): needs root in a mount namespace")
        w.mounts.append(w.cache)
        if fill:
            with open(w.cache / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
        if "ro," in options:
            subprocess.run(["mount", "-o", "remount,ro", str(w.cache)], check=True)
    return make


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
