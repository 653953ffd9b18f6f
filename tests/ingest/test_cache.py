"""The on-disk token cache: warm packs skip the tokenizer, corrupt entries are rewritten, no pickle."""

from __future__ import annotations

import pytest

import ingest
from ingest import tokens
from tests.ingest.fixtures import write_tree

FILES = {"README.md": "# R\n", "a.py": "def f():\n    return 1\n", "b/c.py": "x = [1, 2, 3]\n"}


def entries(cache_dir):
    return sorted(p for p in cache_dir.rglob("*.bin"))


def test_warm_pack_does_not_tokenize(tmp_path, run_pack, cache_dir, monkeypatch):
    write_tree(tmp_path, FILES)
    cold = run_pack(tmp_path)
    assert len(entries(cache_dir)) == len(FILES) + 1

    def boom(*a, **k):
        raise AssertionError("tokenizer called on a warm pack")

    monkeypatch.setattr(tokens.Encoder, "encode", boom)
    warm = run_pack(tmp_path)
    assert (warm.ids == cold.ids).all() and warm.files == cold.files and warm.content_hash == cold.content_hash
    (tmp_path / "a.py").write_text("def f():\n    return 2\n")
    with pytest.raises(AssertionError, match="warm pack"):
        run_pack(tmp_path)


def test_corrupt_entries_are_ignored_and_rewritten(tmp_path, run_pack, cache_dir):
    write_tree(tmp_path, FILES)
    good = run_pack(tmp_path)
    files = entries(cache_dir)
    originals = {p: p.read_bytes() for p in files}
    files[0].write_bytes(b"garbage")
    files[1].write_bytes(originals[files[1]][:-1] + bytes([originals[files[1]][-1] ^ 1]))
    files[2].write_bytes(b"")
    again = run_pack(tmp_path)
    assert (again.ids == good.ids).all() and again.files == good.files
    assert {p: p.read_bytes() for p in entries(cache_dir)} == originals
    assert all(p.read_bytes()[:4] == b"MBTK" for p in files)


def test_no_cache_writes_nothing(tmp_path, run_pack, cache_dir):
    write_tree(tmp_path, FILES)
    run_pack(tmp_path, token_cache=None)
    assert not cache_dir.exists()


def test_the_token_cache_is_the_directory_given_never_the_environment(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "env"))
    repo = write_tree(tmp_path / "repo", FILES)
    ingest.pack(repo, tok, ingest.PackOptions())
    assert not (tmp_path / "env").exists()
    ingest.pack(repo, tok, ingest.PackOptions(token_cache=tmp_path / "given"))
    assert len(entries(tmp_path / "given")) == len(FILES) + 1 and not (tmp_path / "env").exists()


def test_entry_format_roundtrip(tmp_path):
    import numpy as np

    cache = tokens.TokenCache(tmp_path, "abc")
    ids, marks = np.array([5, 1, 70000], np.uint32), np.array([0, 2, 3], np.uint32)
    cache.put("k" * 40, ids, marks)
    got = cache.get("k" * 40)
    assert got is not None and (got[0] == ids).all() and (got[1] == marks).all()
    assert cache.get("z" * 40) is None
    assert not list(tmp_path.rglob(".tmp-*"))
    assert tokens.TokenCache(None, "abc").get("k" * 40) is None


def _fill(cache, n, size=64, start=0):
    import numpy as np

    for i in range(start, start + n):
        cache.put(f"{i:040x}", np.arange(size, dtype=np.uint32), np.zeros(2, np.uint32))


def test_the_cache_is_capped_and_keeps_the_recently_used(tmp_path):
    import os
    import time

    one = tokens.TokenCache(tmp_path / "t", "abc")
    _fill(one, 1)
    entry_size = tokens.usage(tmp_path / "t")[1]
    cache = tokens.TokenCache(tmp_path / "t", "abc", max_bytes=10 * entry_size)
    _fill(cache, 9, start=1)
    old = time.time() - 1000
    for p in (tmp_path / "t").rglob("*.bin"):
        os.utime(p, (old, old))
    assert cache.get(f"{3:040x}") is not None  # a hit makes entry 3 recent
    _fill(cache, 5, start=10)
    n, size = tokens.usage(tmp_path / "t")
    assert size <= 10 * entry_size and n < 14
    assert cache.get(f"{3:040x}") is not None and cache.get(f"{14:040x}") is not None
    assert cache.get(f"{0:040x}") is None


def test_clear_removes_entries_and_dead_writers_temps_only(tmp_path):
    import subprocess

    cache = tokens.TokenCache(tmp_path / "t", "abc")
    _fill(cache, 3)
    shard = next((tmp_path / "t").rglob("*.bin")).parent
    dead = subprocess.Popen(["true"])
    dead.wait()
    (shard / f".tmp-p{dead.pid}-x").write_bytes(b"d" * 10)
    import os

    (shard / f".tmp-p{os.getpid()}-y").write_bytes(b"l" * 10)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"o" * 50)
    (shard / ("f" * 40 + ".bin")).symlink_to(outside)
    n, size = tokens.usage(tmp_path / "t")
    assert n == 3
    assert tokens.clear(tmp_path / "t") == (3, size)
    left = sorted(p.name for p in (tmp_path / "t").rglob("*") if p.is_file() or p.is_symlink())
    assert left == [f".tmp-p{os.getpid()}-y", "f" * 40 + ".bin"] and outside.read_bytes() == b"o" * 50
