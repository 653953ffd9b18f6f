"""Tests for agent.ctxcache: hit, miss, corrupt entries, LRU eviction, oversized and unwritable roots,
the on-disk format (safetensors + JSON, no pickle) and key stability."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from agent import ctxcache
from agent.ctxcache import GIB, ContextCache

ATTN = {"attention": "moba", "block_size": 64, "top_k": 3, "sink_blocks": 1, "dense_layers": [0],
        "dtype": torch.bfloat16}


class Clock:
    """A settable clock for created/last_used."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOBA_ASK_CACHE_MAX_GB", raising=False)
    return tmp_path / "cache" / "contexts"


def kv_tensors(tokens: int = 40, seed: int = 0, layers: int = 2, capacity: int = 96) -> dict:
    """Filled views of MobaLayer-like buffers [B, Hkv, capacity, D] (non-contiguous), several dtypes."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        keys = torch.randn(1, 2, capacity, 16, generator=g).to(torch.bfloat16)
        values = torch.randn(1, 2, capacity, 16, generator=g).to(torch.bfloat16)
        out[f"layers.{i}.keys"] = keys[:, :, :tokens]
        out[f"layers.{i}.values"] = values[:, :, :tokens]
        out[f"layers.{i}.sums"] = torch.randn(1, 2, capacity // 32, 16, generator=g)
    out["filled"] = torch.tensor([tokens], dtype=torch.int64)
    return out


def key_for(content: str, model: str = "tiny-llama") -> str:
    return ContextCache.make_key(model, ATTN, hashlib.sha256(content.encode()).hexdigest())


def meta_for(tokens: int = 40) -> dict:
    return {"model": "tiny-llama", "root": "/repo", "tokens": tokens, "files": ["a.py", "b.py"]}


def assert_same(loaded: dict, saved: dict) -> None:
    assert sorted(loaded) == sorted(saved)
    for name, t in saved.items():
        assert loaded[name].dtype == t.dtype, name
        assert torch.equal(loaded[name], t), name


def stderr_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_defaults_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("MOBA_ASK_CACHE_MAX_GB", "0.5")
    store = ContextCache()
    assert store.root == tmp_path / "c" / "contexts"
    assert store.max_bytes == GIB // 2
    monkeypatch.delenv("MOBA_ASK_CACHE_DIR")
    monkeypatch.delenv("MOBA_ASK_CACHE_MAX_GB")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    store = ContextCache()
    assert store.root == tmp_path / "home" / ".cache" / "moba-ask" / "contexts"
    assert store.max_bytes == 20 * GIB


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_bad_size_limit_is_a_clear_error(root, monkeypatch, value):
    monkeypatch.setenv("MOBA_ASK_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match="MOBA_ASK_CACHE_MAX_GB must be a size in GiB >= 0"):
        ContextCache()
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        ContextCache(max_bytes=-1)


def test_hit_returns_the_saved_tensors_and_meta(root, clock, capsys):
    tensors, key = kv_tensors(), key_for("repo v1")
    path = ContextCache(clock=clock).save(key, tensors, meta_for())
    assert path == root / key
    loaded, meta = ContextCache(clock=clock).load(key, device="cpu")  # a fresh instance: it persisted
    assert_same(loaded, tensors)
    assert meta == meta_for()
    assert stderr_lines(capsys) == []


def test_miss_returns_none_and_writes_nothing(root, capsys):
    store = ContextCache()
    assert store.load(key_for("never saved")) is None
    assert not root.exists()
    assert store.entries() == [] and store.total_bytes() == 0
    ContextCache().save(key_for("other"), kv_tensors(), meta_for())
    assert store.load(key_for("never saved")) is None
    assert stderr_lines(capsys) == []


def test_saving_again_replaces_the_entry(root):
    store, key = ContextCache(), key_for("repo")
    store.save(key, kv_tensors(seed=1), meta_for(40))
    store.save(key, kv_tensors(seed=2, tokens=50), meta_for(50))
    loaded, meta = store.load(key)
    assert_same(loaded, kv_tensors(seed=2, tokens=50))
    assert meta["tokens"] == 50
    assert [p.name for p in root.iterdir()] == [key]


def test_hit_updates_last_used_only(root, clock):
    store, key = ContextCache(clock=clock), key_for("repo")
    store.save(key, kv_tensors(), meta_for())
    clock.t = 2000.0
    assert store.load(key) is not None
    (entry,) = store.entries()
    assert (entry.created, entry.last_used) == (1000.0, 2000.0)
    assert json.loads((root / key / "manifest.json").read_text())["last_used"] == 2000.0


def _truncate(entry):
    kv = entry / "kv.safetensors"
    kv.write_bytes(kv.read_bytes()[: kv.stat().st_size // 2])


def _flip_last_byte(entry):
    """A data byte: safetensors still parses the file, only the checksum can notice."""
    kv = entry / "kv.safetensors"
    data = bytearray(kv.read_bytes())
    data[-1] ^= 0xFF
    kv.write_bytes(bytes(data))


def _flip_header_byte(entry):
    kv = entry / "kv.safetensors"
    data = bytearray(kv.read_bytes())
    data[9] ^= 0x55
    kv.write_bytes(bytes(data))


def _stale_checksum(entry):
    m = json.loads((entry / "manifest.json").read_text())
    m["checksum"]["chunks"][0] = "0" * 64
    (entry / "manifest.json").write_text(json.dumps(m))


def _other_key(entry):
    m = json.loads((entry / "manifest.json").read_text())
    m["key"] = key_for("someone else")
    (entry / "manifest.json").write_text(json.dumps(m))


def _future_format(entry):
    m = json.loads((entry / "manifest.json").read_text())
    m["format"] = ctxcache.FORMAT_VERSION + 1
    (entry / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "truncated": _truncate,
    "flipped-data-byte": _flip_last_byte,
    "flipped-header-byte": _flip_header_byte,
    "manifest-deleted": lambda e: (e / "manifest.json").unlink(),
    "manifest-garbage": lambda e: (e / "manifest.json").write_text("{not json"),
    "manifest-empty": lambda e: (e / "manifest.json").write_text(""),
    "kv-deleted": lambda e: (e / "kv.safetensors").unlink(),
    "stale-checksum": _stale_checksum,
    "manifest-of-another-key": _other_key,
    "other-format-version": _future_format,
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_dropped_with_one_warning_and_rebuilt(root, capsys, corrupt):
    store, key, tensors = ContextCache(), key_for("repo"), kv_tensors()
    store.save(key, tensors, meta_for())
    other = key_for("another repo")
    store.save(other, kv_tensors(seed=5), meta_for())
    corrupt(root / key)
    capsys.readouterr()
    assert store.load(key) is None
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"moba-ask: warning: context cache entry {key} is corrupt; rebuilding")
    assert not (root / key).exists()
    assert [e.key for e in store.entries()] == [other]  # the healthy entry is untouched
    assert store.load(key) is None and stderr_lines(capsys) == []  # now a plain miss
    store.save(key, tensors, meta_for())
    assert_same(store.load(key)[0], tensors)
    assert stderr_lines(capsys) == []


def test_lru_eviction_drops_least_recently_used_first(root, clock):
    probe = ContextCache(root / "probe", clock=clock)
    probe.save(key_for("probe"), kv_tensors(), meta_for())
    size = probe.total_bytes()
    store = ContextCache(max_bytes=int(3.5 * size), clock=clock)
    a, b, c, d, e = (key_for(name) for name in "abcde")
    for t, k in enumerate((a, b, c), start=1):
        clock.t = float(t)
        store.save(k, kv_tensors(seed=t), meta_for())
    clock.t = 4.0
    assert store.load(a) is not None  # a is now the most recently used
    clock.t = 5.0
    store.save(d, kv_tensors(seed=4), meta_for())
    assert {x.key for x in store.entries()} == {a, c, d}  # b, the least recently used, went
    clock.t = 6.0
    store.save(e, kv_tensors(seed=5), meta_for())
    assert [x.key for x in store.entries()] == [a, d, e]  # then c; listed LRU first
    assert store.total_bytes() <= store.max_bytes
    clock.t = 7.0
    big = key_for("big")
    store.save(big, kv_tensors(seed=6, tokens=96), meta_for())
    assert store.entries()[-1].key == big and len(store.entries()) < 3  # several went for one big entry
    assert store.total_bytes() <= store.max_bytes


def test_broken_entries_are_evicted_first(root, clock):
    store = ContextCache(clock=clock)
    old, broken = key_for("old"), key_for("broken")
    store.save(old, kv_tensors(), meta_for())
    one = store.total_bytes()
    clock.t += 10
    store.save(broken, kv_tensors(seed=1), meta_for())
    (root / broken / "manifest.json").unlink()
    store.max_bytes = 2 * one + 50  # room for two whole entries: the broken one must go, not the old one
    clock.t += 10
    store.save(key_for("new"), kv_tensors(seed=2), meta_for())
    assert {e.key for e in store.entries()} == {old, key_for("new")}


def test_entry_larger_than_the_limit_is_not_stored_and_evicts_nothing(root, capsys):
    store = ContextCache()
    small = key_for("small")
    store.save(small, kv_tensors(tokens=4), meta_for())
    store.max_bytes = store.total_bytes() + 100
    big = key_for("big")
    assert store.save(big, kv_tensors(tokens=90), meta_for()) is None
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"moba-ask: warning: context cache entry {big[:12]} needs ")
    assert "not stored (raise MOBA_ASK_CACHE_MAX_GB)" in line
    assert [e.key for e in store.entries()] == [small]
    assert [p.name for p in root.iterdir()] == [small]  # no temp leftovers either


def test_entry_over_the_limit_only_with_its_manifest_is_removed(root, capsys):
    tensors = kv_tensors()
    payload = sum(t.numel() * t.element_size() for t in tensors.values())
    store = ContextCache(max_bytes=payload + 1)  # the tensors fit, header + manifest do not
    assert store.save(key_for("x"), tensors, meta_for()) is None
    assert "not stored" in stderr_lines(capsys)[0]
    assert list(root.iterdir()) == []


def test_zero_limit_stores_nothing_silently(root, capsys):
    store = ContextCache(max_bytes=0)
    assert store.save(key_for("x"), kv_tensors(), meta_for()) is None
    assert store.entries() == [] and stderr_lines(capsys) == []


def test_root_under_a_file_warns_once_and_never_raises(tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file")
    store = ContextCache(blocker / "contexts")
    assert store.save(key_for("a"), kv_tensors(), meta_for()) is None
    assert store.save(key_for("b"), kv_tensors(), meta_for()) is None
    (line,) = stderr_lines(capsys)
    assert line.startswith(f"moba-ask: warning: context cache {blocker / 'contexts'} is not writable")
    assert "MOBA_ASK_CACHE_DIR" in line
    assert store.load(key_for("a")) is None
    assert store.entries() == [] and store.total_bytes() == 0
    assert blocker.read_text() == "a regular file"


def test_failed_rename_leaves_no_entry_and_no_temp_files(root, monkeypatch, capsys):
    store = ContextCache()
    store.save(key_for("kept"), kv_tensors(), meta_for())

    def refuse(src, dst, **dir_fds):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ctxcache.os, "replace", refuse)
    assert store.save(key_for("new"), kv_tensors(seed=3), meta_for()) is None
    assert store.save(key_for("newer"), kv_tensors(seed=4), meta_for()) is None
    (line,) = stderr_lines(capsys)
    assert "is not writable (Permission denied)" in line
    assert [p.name for p in root.iterdir()] == [key_for("kept")]


def test_read_only_cache_still_serves_hits(root, monkeypatch, capsys, clock):
    store = ContextCache(clock=clock)
    key, tensors = key_for("repo"), kv_tensors()
    store.save(key, tensors, meta_for())
    def refuse(src, dst, **dir_fds):
        raise PermissionError(13, "no")

    monkeypatch.setattr(ctxcache.os, "replace", refuse)
    clock.t = 5000.0
    assert_same(store.load(key)[0], tensors)
    assert store.entries()[0].last_used == 1000.0  # could not record the use; no harm, no noise
    assert stderr_lines(capsys) == []


def test_failed_write_leaves_no_temp_dir(root, monkeypatch):
    store = ContextCache()
    store.root.mkdir(parents=True)

    def broken_save_file(tensors, filename):
        open(filename, "wb").write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save_file)
    assert store.save(key_for("x"), kv_tensors(), meta_for()) is None
    assert list(root.iterdir()) == []


def test_stale_temp_dirs_are_swept_fresh_ones_kept(root):
    root.mkdir(parents=True)
    stale, fresh = root / ".tmp-abc-1", root / ".tmp-abc-2"
    for d in (stale, fresh):
        d.mkdir()
        (d / "kv.safetensors").write_bytes(b"x" * 10)
    os.utime(stale, (0, 0))
    store = ContextCache()
    store.save(key_for("x"), kv_tensors(), meta_for())
    assert not stale.exists() and fresh.exists()
    assert [e.key for e in store.entries()] == [key_for("x")]
    size = store.total_bytes()
    assert store.clear() == (1, size)
    assert list(root.iterdir()) == [fresh]  # a young temp of a writer we cannot identify stays


def test_files_are_safetensors_and_json_never_pickle(root):
    key, tensors = key_for("repo"), kv_tensors()
    entry = ContextCache().save(key, tensors, meta_for())
    assert sorted(p.name for p in entry.iterdir()) == ["kv.safetensors", "manifest.json"]
    raw = (entry / "kv.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(tensors)
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch.save zip
    with safe_open(entry / "kv.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        assert torch.equal(f.get_tensor("layers.1.keys"), tensors["layers.1.keys"])
        assert f.get_tensor("layers.0.values").dtype == torch.bfloat16
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["format"] == ctxcache.FORMAT_VERSION and manifest["key"] == key
    assert manifest["size"] == len(raw)
    assert manifest["checksum"] == {"algorithm": "sha256", "chunk_bytes": ctxcache.HASH_CHUNK,
                                    "chunks": [hashlib.sha256(raw).hexdigest()]}
    assert manifest["meta"] == meta_for() and manifest["tensors"] == sorted(tensors)
    assert manifest["created"] == manifest["last_used"]


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 17])
def test_chunk_sha256_matches_hashlib_on_pieces(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "f").write_bytes(data)
    expected = [hashlib.sha256(data[i : i + 4096]).hexdigest() for i in range(0, max(size, 1), 4096)]
    assert ctxcache.chunk_sha256(tmp_path / "f", 4096) == expected


def test_a_flip_in_any_piece_is_caught(root, monkeypatch, capsys):
    monkeypatch.setattr(ctxcache, "HASH_CHUNK", 4096)
    store, key, tensors = ContextCache(), key_for("repo"), kv_tensors()
    entry = store.save(key, tensors, meta_for())
    raw = (entry / "kv.safetensors").read_bytes()
    chunks = json.loads((entry / "manifest.json").read_text())["checksum"]["chunks"]
    assert chunks == [hashlib.sha256(raw[i : i + 4096]).hexdigest() for i in range(0, len(raw), 4096)]
    assert len(chunks) >= 3
    assert_same(store.load(key)[0], tensors)
    data = bytearray(raw)
    data[len(raw) // 2] ^= 0x01
    (entry / "kv.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert store.load(key) is None
    assert "is corrupt; rebuilding (checksum mismatch)" in capsys.readouterr().err


def test_entries_report_meta_size_and_broken_dirs(root, clock):
    store = ContextCache(clock=clock)
    good, broken = key_for("good"), key_for("broken")
    store.save(good, kv_tensors(), {"model": "m1", "root": ["/a", "/b"], "tokens": 40})
    store.save(broken, kv_tensors(), meta_for())
    (root / broken / "manifest.json").write_text("[]")
    (root / "not-a-key").mkdir()
    entries = {e.key: e for e in store.entries()}
    assert set(entries) == {good, broken}
    e = entries[good]
    assert (e.model, e.source, e.tokens, e.ok, e.created) == ("m1", "/a, /b", 40, True, 1000.0)
    assert e.size == sum(p.stat().st_size for p in (root / good).iterdir())
    assert entries[broken].ok is False and entries[broken].model is None
    assert store.total_bytes() == e.size + entries[broken].size


def test_clear_one_or_all(root):
    store = ContextCache()
    keys = [key_for(str(i)) for i in range(3)]
    for i, k in enumerate(keys):
        store.save(k, kv_tensors(seed=i), meta_for())
    sizes = {e.key: e.size for e in store.entries()}
    assert store.clear(keys[1]) == (1, sizes[keys[1]])
    assert store.clear(keys[1]) == (0, 0)
    assert {e.key for e in store.entries()} == {keys[0], keys[2]}
    assert store.clear() == (2, sizes[keys[0]] + sizes[keys[2]])
    assert store.entries() == [] and store.total_bytes() == 0
    assert ContextCache(root.parent / "nowhere").clear() == (0, 0)


@pytest.mark.parametrize("bad", ["", "abc", "G" * 64, "A" * 64, "../" + "a" * 61])
def test_bad_keys_are_rejected(root, bad):
    store = ContextCache()
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        store.load(bad)
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        store.save(bad, kv_tensors(), meta_for())


def test_meta_must_be_json(root, tmp_path):
    with pytest.raises(TypeError):
        ContextCache().save(key_for("x"), kv_tensors(), {"model": object()})
    assert not root.exists() or list(root.iterdir()) == []
    store = ContextCache()
    store.save(key_for("x"), kv_tensors(), {"root": tmp_path, "dtype": torch.bfloat16, "layers": {2, 1}})
    assert store.load(key_for("x"))[1] == {"root": str(tmp_path), "dtype": "torch.bfloat16", "layers": [1, 2]}
    assert store.entries()[0].source == str(tmp_path)


def test_key_is_stable_and_ignores_dict_order():
    content = hashlib.sha256(b"repo").hexdigest()
    k = ContextCache.make_key("m", ATTN, content)
    assert len(k) == 64 and int(k, 16) >= 0
    assert ContextCache.make_key("m", dict(reversed(list(ATTN.items()))), content) == k
    assert ContextCache.make_key("m", {**ATTN, "dense_layers": (0,)}, content) == k  # tuple == list


def test_key_is_the_same_in_another_process():
    code = ("from agent.ctxcache import ContextCache; "
            "print(ContextCache.make_key('m', {'layers': {3, 1, 2}, 'names': {'b', 'a', 'c'}}, 'h'))")
    keys = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2")}
    assert keys == {ContextCache.make_key("m", {"layers": [1, 2, 3], "names": ["a", "b", "c"]}, "h")}


CHANGES = {
    "model": ("other-model", ATTN, "c"),
    "content": ("m", ATTN, "d"),
    "kind": ("m", {**ATTN, "attention": "dense"}, "c"),
    "block_size": ("m", {**ATTN, "block_size": 128}, "c"),
    "top_k": ("m", {**ATTN, "top_k": 4}, "c"),
    "sinks": ("m", {**ATTN, "sink_blocks": 0}, "c"),
    "dense_layers": ("m", {**ATTN, "dense_layers": [0, 1]}, "c"),
    "dtype": ("m", {**ATTN, "dtype": torch.float16}, "c"),
    "extra_field": ("m", {**ATTN, "window": 2}, "c"),
    "missing_field": ("m", {k: v for k, v in ATTN.items() if k != "top_k"}, "c"),
}


def test_every_input_changes_the_key():
    base = ContextCache.make_key("m", ATTN, "c")
    keys = {name: ContextCache.make_key(*args) for name, args in CHANGES.items()}
    assert base not in keys.values()
    assert len(set(keys.values())) == len(keys)


def test_key_rejects_values_json_cannot_hold():
    with pytest.raises(TypeError, match="cannot put object"):
        ContextCache.make_key("m", {"x": object()}, "c")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(root):
    key, tensors = key_for("repo"), {k: v.cuda() for k, v in kv_tensors().items()}
    ContextCache().save(key, tensors, meta_for())
    loaded, _ = ContextCache().load(key, device="cuda")
    assert all(t.is_cuda for t in loaded.values())
    assert_same({k: v.cpu() for k, v in loaded.items()}, {k: v.cpu() for k, v in tensors.items()})
