"""Hostile inputs to the context cache: read errors that must not delete, full disks, temp
directories of live and dead writers (kill -9 included), `clear` during a save, links and
manifests that point outside the cache, and racing saves of one key."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

from agent import cachefs, ctxcache
from agent.ctxcache import ContextCache
from tests.agent.test_ctxcache import assert_same, key_for, kv_tensors, meta_for, stderr_lines


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOBA_ASK_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache" / "contexts"

ENOSPC_MESSAGE = "Error while serializing: I/O error: No space left on device (os error 28)"


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error")], ids=["EACCES", "EIO"])
def test_a_read_error_keeps_the_entry(root, monkeypatch, capsys, error):
    store, key, tensors = ContextCache(), key_for("repo"), kv_tensors()
    store.save(key, tensors, meta_for())

    def refuse(*a, **k):
        raise error

    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    capsys.readouterr()
    assert store.load(key) is None
    (line,) = stderr_lines(capsys)
    assert f"context cache entry {key[:12]} cannot be read ({error.strerror})" in line
    assert "corrupt" not in line
    monkeypatch.undo()
    assert_same(store.load(key)[0], tensors)  # the transient error destroyed nothing


def test_an_io_error_while_hashing_keeps_the_entry(root, monkeypatch, capsys):
    store, key, tensors = ContextCache(), key_for("repo"), kv_tensors()
    store.save(key, tensors, meta_for())
    real = ctxcache.chunk_sha256

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ctxcache, "chunk_sha256", eio)
    assert store.load(key) is None
    assert "corrupt" not in capsys.readouterr().err
    monkeypatch.setattr(ctxcache, "chunk_sha256", real)
    assert_same(store.load(key)[0], tensors)


def test_full_disk_save_warns_once_never_raises_and_leaves_no_temp(root, monkeypatch, capsys):
    store = ContextCache()
    store.save(key_for("kept"), kv_tensors(), meta_for())

    def full(tensors, filename):
        Path(filename).write_bytes(b"half")
        raise SafetensorError(ENOSPC_MESSAGE)

    monkeypatch.setattr("safetensors.torch.save_file", full)
    assert store.save(key_for("a"), kv_tensors(), meta_for()) is None
    assert store.save(key_for("b"), kv_tensors(), meta_for()) is None
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"moba-ask: warning: context cache {root} is full (No space left on device)")
    assert [p.name for p in root.iterdir()] == [key_for("kept")]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_tmpfs(tmp_path, capsys):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = ContextCache(mnt / "contexts")
        assert store.save(key_for("big"), kv_tensors(tokens=90, capacity=32768), meta_for()) is None
        assert "is full (No space left on device)" in capsys.readouterr().err
        assert list((mnt / "contexts").iterdir()) == []
        assert store.save(key_for("small"), kv_tensors(tokens=4, capacity=8, layers=1), meta_for()) is not None
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_clear_during_a_save_leaves_the_writer_alone(root, monkeypatch):
    from safetensors.torch import save_file as real_save

    cleared = []

    def save_then_clear(tensors, filename):
        real_save(tensors, filename)
        cleared.append(ContextCache().clear())  # another process's `moba-ask cache clear`

    monkeypatch.setattr("safetensors.torch.save_file", save_then_clear)
    key, tensors = key_for("repo"), kv_tensors()
    assert ContextCache().save(key, tensors, meta_for()) == root / key
    assert cleared == [(0, 0)]
    assert_same(ContextCache().load(key)[0], tensors)


def test_the_writer_survives_its_temp_dir_vanishing(root, monkeypatch, capsys):
    from safetensors.torch import save_file as real_save

    def vanish(tensors, filename):
        shutil.rmtree(Path(filename).parent)
        real_save(tensors, filename)

    monkeypatch.setattr("safetensors.torch.save_file", vanish)
    assert ContextCache().save(key_for("x"), kv_tensors(), meta_for()) is None
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"moba-ask: warning: context cache {root} is not writable (No such file")
    assert line.endswith("contexts will not be saved (set MOBA_ASK_CACHE_DIR to a writable directory)")
    assert list(root.iterdir()) == []


def test_temps_of_dead_writers_go_at_open_live_ones_stay(root):
    root.mkdir(parents=True)
    dead = root / f".tmp-p{dead_pid()}-0123456789ab-deadbeef"
    live = root / f".tmp-p{os.getpid()}-0123456789ab-cafecafe"
    trash = root / f".trash-p{dead_pid()}-0123456789ab-feedfeed"
    for d in (dead, live, trash):
        d.mkdir()
        (d / "kv.safetensors").write_bytes(b"x" * 4096)
    ContextCache()
    assert not dead.exists() and not trash.exists() and live.exists()
    assert ContextCache().clear() == (0, 0)
    assert live.exists()


def test_kill_9_during_a_write_leaves_nothing_after_the_next_open(root, tmp_path):
    code = textwrap.dedent(f"""
        import time, torch, safetensors.torch as st
        from agent.ctxcache import ContextCache
        real = st.save_file
        def slow(tensors, filename):
            real(tensors, filename)
            open({str(tmp_path / "written")!r}, "w").close()
            time.sleep(600)
        st.save_file = slow
        ContextCache().save("{key_for('big')}", {{"k": torch.zeros(4 << 20)}}, {{}})
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "written").exists():
            assert proc.poll() is None and time.time() < deadline, "the writer did not start"
            time.sleep(0.1)
        (tmp,) = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
        assert (tmp / "kv.safetensors").stat().st_size > 16 << 20
        ContextCache().clear()
        assert tmp.exists()  # its writer is alive
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ContextCache()
    assert list(root.iterdir()) == []


def _valid_entry_elsewhere(tmp_path, key) -> Path:
    other = ContextCache(tmp_path / "elsewhere")
    other.save(key, kv_tensors(), meta_for())
    return other.root / key


def test_an_entry_linked_outside_is_refused_not_read_or_deleted(root, tmp_path, capsys):
    key = key_for("repo")
    outside = _valid_entry_elsewhere(tmp_path, key)
    before = sorted((p.name, p.read_bytes()) for p in outside.iterdir())
    root.mkdir(parents=True)
    (root / key).symlink_to(outside)
    store = ContextCache()
    assert store.load(key) is None
    assert "is a symbolic link; ignored" in capsys.readouterr().err
    assert store.entries() == []
    assert store.clear() == (0, 0)
    assert not os.path.lexists(root / key)
    assert sorted((p.name, p.read_bytes()) for p in outside.iterdir()) == before


def test_a_linked_manifest_is_corrupt_and_its_target_untouched(root, tmp_path, capsys):
    key = key_for("repo")
    outside = _valid_entry_elsewhere(tmp_path, key)
    store = ContextCache()
    entry = store.save(key, kv_tensors(), meta_for())
    (entry / "manifest.json").unlink()
    (entry / "manifest.json").symlink_to(outside / "manifest.json")
    target = (outside / "manifest.json").read_text()
    assert store.load(key) is None
    assert "is corrupt; rebuilding (manifest.json is a symbolic link)" in capsys.readouterr().err
    assert not entry.exists() and (outside / "manifest.json").read_text() == target


def test_a_linked_kv_file_counts_only_the_link_when_cleared(root, tmp_path):
    big = tmp_path / "precious.bin"
    big.write_bytes(b"p" * 100_000)
    store = ContextCache()
    entry = store.save(key_for("repo"), kv_tensors(), meta_for())
    manifest_size = (entry / "manifest.json").stat().st_size
    (entry / "kv.safetensors").unlink()
    (entry / "kv.safetensors").symlink_to(big)
    assert store.entries()[0].size == manifest_size
    assert store.clear() == (1, manifest_size)
    assert big.read_bytes() == b"p" * 100_000


def test_racing_saves_of_one_key_never_corrupt_it(root, capsys):
    key = key_for("repo")
    versions = [kv_tensors(seed=s) for s in range(2)]
    errors = []

    def writer(tensors):
        store = ContextCache()
        for _ in range(6):
            try:
                assert store.save(key, tensors, meta_for()) is not None
            except AssertionError as e:
                errors.append(e)

    def reader():
        store = ContextCache()
        for _ in range(12):
            store.load(key)

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert "corrupt" not in capsys.readouterr().err
    loaded, meta = ContextCache().load(key)
    assert any(all(loaded[n].equal(v[n]) for n in v) for v in versions)
    assert [p.name for p in root.iterdir()] == [key]
    assert json.loads((root / key / "manifest.json").read_text())["key"] == key


def test_a_save_whose_old_entry_another_writer_just_moved_still_stores(root, monkeypatch, capsys):
    """The window the racing test hits now and then: the old entry exists when checked and is gone
    (moved by a concurrent writer) when this writer moves it aside."""
    store, key = ContextCache(), key_for("repo")
    store.save(key, kv_tensors(seed=0), meta_for())
    real_lexists, moved = os.path.lexists, []

    def lexists_then_vanish(path):
        found = real_lexists(path)
        if found and Path(path) == root / key and not moved:
            moved.append(path)
            shutil.rmtree(path)
        return found

    new = kv_tensors(seed=1)
    with monkeypatch.context() as m:
        m.setattr(ctxcache.os.path, "lexists", lexists_then_vanish)
        assert store.save(key, new, meta_for()) == root / key
    assert moved
    assert "not writable" not in capsys.readouterr().err
    assert_same(ContextCache().load(key)[0], new)


def test_a_hit_replaced_while_its_last_used_is_written_leaves_the_new_entry_intact(root, monkeypatch, capsys):
    """A load's last_used update and a concurrent save of the same key: the update goes to the entry the
    load read, never into the new one (whose manifest it would overwrite with the old checksums)."""
    store, key = ContextCache(), key_for("repo")
    store.save(key, kv_tensors(seed=0), meta_for())
    new, real_temp_name, fired = kv_tensors(seed=1), cachefs.temp_name, []

    def temp_name_then_replace(prefix, tag):
        if tag == "manifest.json" and not fired:
            fired.append(tag)
            assert ContextCache().save(key, new, meta_for()) == root / key
        return real_temp_name(prefix, tag)

    with monkeypatch.context() as m:
        m.setattr(cachefs, "temp_name", temp_name_then_replace)
        store.load(key)
    assert fired
    loaded = ContextCache().load(key)
    assert "corrupt" not in capsys.readouterr().err
    assert_same(loaded[0], new)
