"""The session's use of the context cache: the key covers the model's files and every setting that
changes the KV, and a restore is all or nothing (a mismatching entry is dropped, never extended)."""

import dataclasses
import types

import pytest
import torch

import ingest
from agent import runtime as runtime_mod
from agent.cachefs import fingerprint
from agent.config import AskConfig
from agent.ctxcache import ContextCache
from agent.session import Session
from tests.agent.fakes import FakeRuntime, fake_tokenizer
from tests.ingest.fixtures import write_tree


@pytest.fixture
def repo(tmp_path):
    return write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n", "README.md": "# R\n"})


@pytest.fixture
def weights(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"layers": 2}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 1024)
    return d


def session(repo, store, rt=None, **cfg) -> Session:
    rt = rt or FakeRuntime(answers=["The value is 7391046."] * 3)
    pack = ingest.pack([repo], rt.tokenizer, ingest.PackOptions())
    s = Session(rt, pack, AskConfig(**cfg), "ask", store)
    s.open()
    return s


def context_ids(s: Session) -> list[int]:
    return list(s.prefix_ids) + [int(i) for i in s.pack.ids]


def first_run(repo, store, **kw) -> Session:
    s = session(repo, store, **kw)
    s.ask("What is MAGIC_NUMBER?")
    assert len(store.entries()) == 1
    return s


def runtime_of(weights) -> FakeRuntime:
    rt = FakeRuntime(answers=["ok"] * 3)
    rt.identity = fingerprint(weights)
    return rt


def test_unchanged_model_hits(repo, tmp_path, weights):
    store = ContextCache(tmp_path / "ctx")
    first_run(repo, store, rt=runtime_of(weights))
    again = session(repo, store, rt=runtime_of(weights))
    assert again.stats["cache_hit"] is True and again.engine.prefills == []


def test_replaced_weights_at_the_same_path_miss(repo, tmp_path, weights):
    store = ContextCache(tmp_path / "ctx")
    first_run(repo, store, rt=runtime_of(weights))
    st = (weights / "model.safetensors").stat()
    (weights / "model.safetensors").write_bytes(bytes(reversed(range(256))) * 1024)  # same size
    import os

    os.utime(weights / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    again = session(repo, store, rt=runtime_of(weights))
    assert again.stats["cache_hit"] is False and again.engine.prefills == [again.context_len]


CHANGES = {
    "block_size": dict(block_size=128), "top_k": dict(top_k=3), "sink_blocks": dict(sink_blocks=0),
    "dense_layers": dict(dense_layers=(0,)), "qa_policy": dict(qa_policy="moba"),
    "attention": dict(attention="dense"), "chunk_size": dict(chunk_size=64),
    "local_blocks": dict(local_blocks=1), "gate_subblocks": dict(gate_subblocks=2),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_kv_setting_changed_misses(repo, tmp_path, change):
    store = ContextCache(tmp_path / "ctx")
    first_run(repo, store)
    again = session(repo, store, **change)
    assert again.stats["cache_hit"] is False


def test_engine_dtype_chunk_and_device_kind_change_the_key(repo, tmp_path):
    store = ContextCache(tmp_path / "ctx")
    first_run(repo, store)
    for attr, value in (("dtype", torch.bfloat16), ("chunk_size", 64)):
        rt = FakeRuntime(answers=["ok"])
        engine_type = type("E", (rt._make(1).__class__,), {attr: value})
        rt.make_engine = lambda capacity, params=None, rt=rt, t=engine_type: t(rt, capacity, params)
        assert session(repo, store, rt=rt).stats["cache_hit"] is False, attr
    rt = FakeRuntime(answers=["ok"])
    rt.device = "cuda:1"
    assert session(repo, store, rt=rt).stats["cache_hit"] is False
    assert session(repo, store).stats["cache_hit"] is True


def test_load_runtime_fingerprints_the_loaded_files(weights, monkeypatch):
    tok = fake_tokenizer()
    info = types.SimpleNamespace(path=weights, num_layers=2, name="m", has_chat_template=True,
                                 max_position_embeddings=4096)
    model = types.SimpleNamespace(config=types.SimpleNamespace(), modules=lambda: [])
    monkeypatch.setattr("agent.load.load_model", lambda *a, **k: (model, tok, info))
    rt = runtime_mod.load_runtime(AskConfig(model="m", device="cpu"))
    assert rt.identity == fingerprint(weights)
    (weights / "config.json").write_text('{"layers": 3}')
    assert runtime_mod.load_runtime(AskConfig(model="m", device="cpu")).identity != rt.identity


def _poison(store: ContextCache, first: Session, ids: list[int], tokens: int) -> str:
    (entry,) = store.entries()
    tensors = {f"k.{i}": torch.tensor(ids) for i in range(2)} | {f"v.{i}": torch.zeros(len(ids)) for i in range(2)}
    store.save(entry.key, tensors, dict(model="fake-model", root=first.pack.root, tokens=tokens))
    return entry.key


@pytest.mark.parametrize("shape", ["short", "long", "meta-says-short"])
def test_a_mismatching_entry_is_dropped_and_prefill_starts_clean(repo, tmp_path, capsys, shape):
    store = ContextCache(tmp_path / "ctx")
    first = first_run(repo, store)
    good = context_ids(first)
    ids, tokens = {"short": (good[:-7], len(good)), "long": (good + [5, 6, 7], len(good)),
                   "meta-says-short": (good, len(good) - 1)}[shape]
    key = _poison(store, first, ids, tokens)
    capsys.readouterr()
    again = session(repo, store)
    assert again.stats["cache_hit"] is False
    assert again.engine.ids == good and again.engine.prefills == [len(good)]  # not appended to the entry
    assert f"context cache entry {key} is corrupt; rebuilding" in capsys.readouterr().err
    again.ask("What is MAGIC_NUMBER?")
    saved, meta = store.load(key)
    assert saved["k.0"].tolist() == good and meta["tokens"] == len(good)  # the bad entry was not saved again


def test_a_restore_that_raises_leaves_the_cache_empty(repo, tmp_path, capsys):
    store = ContextCache(tmp_path / "ctx")
    first = first_run(repo, store)
    (entry,) = store.entries()
    store.save(entry.key, {"keys.0": torch.tensor(context_ids(first))}, dict(tokens=first.context_len))
    again = session(repo, store)
    assert again.stats["cache_hit"] is False and again.engine.ids == context_ids(first)
    assert "restored tensors that do not fit this model (KeyError)" in capsys.readouterr().err


def test_runtime_identity_is_a_field():
    assert "identity" in {f.name for f in dataclasses.fields(FakeRuntime)}
