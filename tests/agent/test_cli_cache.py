"""CLI tests for `moba-ask cache list|clear` with click's CliRunner on a temp $MOBA_ASK_CACHE_DIR."""

import json
import os
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from agent import ctxcache
from agent.commands.cache import cache
from agent.ctxcache import ContextCache
from tests.agent.test_ctxcache import kv_tensors


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MOBA_ASK_CACHE_MAX_GB", raising=False)
    return ContextCache()


def run(*args, input=None):
    result = CliRunner().invoke(cache, list(args), input=input, env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert "Traceback" not in result.output + result.stderr
    return result


def add(store: ContextCache, name: str, tokens: int = 40, model: str = "smollm2-135m", ago: float = 0) -> str:
    key = ContextCache.make_key(model, {"attention": "moba"}, name)
    store._clock = lambda: time.time() - ago
    store.save(key, kv_tensors(tokens=tokens), {"model": model, "root": f"/src/{name}", "tokens": tokens})
    return key


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error:")
    for f in fragments:
        assert f in line


def test_list_empty(store):
    result = run("list")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert f"the context cache in {store.root} is empty" in result.stderr
    assert json.loads(run("list", "--json").stdout) == []


def test_list_table(store):
    old = add(store, "old-repo", tokens=1234, ago=7200)
    new = add(store, "new-repo", tokens=40, model="qwen2.5-coder-1.5b")
    result = run("list")
    assert result.exit_code == 0 and result.stderr == ""
    out = result.stdout
    assert f"context cache in {store.root}" in out
    for text in (old[:12], new[:12], "smollm2-135m", "qwen2.5-coder-1.5b", "/src/old-repo", "1,234",
                 "2 h ago", "just now", ctxcache.format_bytes(store.entries()[0].size)):
        assert text in out, text
    assert old not in out  # only a key prefix
    assert out.index(new[:12]) < out.index(old[:12])  # most recently used first
    assert "\x1b[" not in out


def test_list_json(store):
    old = add(store, "old-repo", ago=60)
    new = add(store, "new-repo")
    rows = json.loads(run("list", "--json").stdout)
    assert [r["key"] for r in rows] == [new, old]
    by_key = {e.key: e for e in store.entries()}
    for r in rows:
        e = by_key[r["key"]]
        assert r == {"key": e.key, "model": "smollm2-135m", "root": e.source, "tokens": 40,
                     "size_bytes": e.size,
                     "created": r["created"], "last_used": r["last_used"], "ok": True, "path": str(e.path)}
        assert r["created"].endswith("+00:00")


def test_list_shows_a_corrupt_entry(store):
    key = add(store, "repo")
    (store.root / key / "manifest.json").unlink()
    assert "corrupt" in run("list").stdout
    (row,) = json.loads(run("list", "--json").stdout)
    assert row["ok"] is False and row["key"] == key


def test_clear_all_with_yes(store):
    keys = [add(store, f"r{i}") for i in range(3)]
    size = store.total_bytes()
    result = run("clear", "--yes")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"freed 3 cached contexts, {ctxcache.format_bytes(size)} ({size} bytes)"
    assert store.entries() == []
    assert all(not (store.root / k).exists() for k in keys)


def test_clear_one_by_prefix(store):
    keep, drop = add(store, "keep"), add(store, "drop")
    size = {e.key: e.size for e in store.entries()}[drop]
    result = run("clear", drop[:8].upper(), "-y")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"freed 1 cached context, {ctxcache.format_bytes(size)} ({size} bytes)"
    assert [e.key for e in store.entries()] == [keep]


def test_clear_asks_first(store):
    key = add(store, "repo")
    declined = run("clear", input="n\n")
    assert declined.exit_code == 1
    assert "Delete 1 cached context (" in declined.stderr and str(store.root) in declined.stderr
    assert declined.stdout == ""
    assert [e.key for e in store.entries()] == [key]
    accepted = run("clear", key[:6], input="y\n")
    assert accepted.exit_code == 0 and accepted.stdout.startswith("freed 1 cached context")
    assert store.entries() == []


def test_clear_empty_cache(store):
    result = run("clear", "--yes")
    assert result.exit_code == 0 and result.stdout == ""
    assert "is empty; nothing to clear" in result.stderr


@pytest.mark.parametrize("prefix", ["xyz!", "", "12 34"])
def test_clear_rejects_a_non_hex_prefix(store, prefix):
    add(store, "repo")
    one_line_error(run("clear", prefix, "--yes"), 1, "KEY_PREFIX must be hex digits", repr(prefix))
    assert len(store.entries()) == 1


def test_clear_unknown_prefix(store):
    key = add(store, "repo")
    missing = next(c for c in "0123456789abcdef" if c != key[0])
    one_line_error(run("clear", missing, "--yes"), 1, "no cached context has a key starting with",
                   "moba-ask cache list")
    assert len(store.entries()) == 1


def test_clear_ambiguous_prefix(store):
    keys: dict[str, str] = {}
    for i in range(17):  # 17 keys: two of them share a first hex digit
        k = add(store, f"r{i}")
        if k[0] in keys:
            break
        keys[k[0]] = k
    one_line_error(run("clear", k[0], "--yes"), 1, "2 cached contexts have keys starting with",
                   "more characters")
    assert len(store.entries()) == len(keys) + 1


def test_clear_unwritable_is_one_line(store, monkeypatch):
    add(store, "repo")
    def refuse(src, dst):
        raise PermissionError(13, "denied")

    monkeypatch.setattr(ctxcache.os, "replace", refuse)
    one_line_error(run("clear", "--yes"), 1, "cannot delete from", "denied")


def test_bad_size_limit_env(store, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_MAX_GB", "lots")
    one_line_error(run("list"), 1, "MOBA_ASK_CACHE_MAX_GB must be a size in GiB")


def test_through_the_moba_ask_group(store):
    from agent.cli import cli

    key = add(store, "repo")
    runner = CliRunner()
    listed = runner.invoke(cli, ["cache", "list", "--json"], prog_name="moba-ask")
    assert listed.exit_code == 0, listed.output
    assert [r["key"] for r in json.loads(listed.stdout)] == [key]
    cleared = runner.invoke(cli, ["cache", "clear", key[:10], "--yes"], prog_name="moba-ask")
    assert cleared.exit_code == 0 and cleared.stdout.startswith("freed 1 cached context")
    assert store.entries() == []


@pytest.mark.parametrize("args", [["--help"], ["list", "--help"], ["clear", "--help"]])
def test_help_has_examples(args):
    result = run(*args)
    assert result.exit_code == 0
    assert "Examples:" in result.stdout and "moba-ask cache" in result.stdout


def test_list_and_clear_do_not_import_torch(store, tmp_path):
    """Managing the cache stays quick: torch loads only when tensors are saved or loaded."""
    add(store, "repo")
    code = ("import sys; from click.testing import CliRunner; from agent.commands.cache import cache; "
            "r = CliRunner().invoke(cache, ['list', '--json']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(cache, ['clear', '--yes']); assert 'freed 1' in r.output, r.output; "
            "print('torch' in sys.modules)")
    env = {**os.environ, "MOBA_ASK_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "False"
    assert store.entries() == []


def _token_entries(root):
    return [p for p in (root / "tokens").rglob("*.bin")] if (root / "tokens").exists() else []


def test_no_cache_ask_writes_no_token_cache(tmp_path, monkeypatch):
    from agent.cli import cli
    from tests.agent.fakes import FakeRuntime
    from tests.ingest.fixtures import write_tree

    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    rt = FakeRuntime(answers=["ok", "ok"], block_size=64)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    repo = write_tree(tmp_path / "repo", {"a.py": "x = 1\n"})
    r = CliRunner().invoke(cli, [str(repo), "what is x?", "--no-cache"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "cache").exists()
    r = CliRunner().invoke(cli, [str(repo), "what is x?"], catch_exceptions=False)
    assert r.exit_code == 0 and _token_entries(tmp_path / "cache")


def test_list_and_clear_cover_the_token_cache(store, tmp_path):
    import numpy as np

    from agent import paths
    from ingest import tokens

    add(store, "repo")
    tc = tokens.TokenCache(paths.tokens_dir(), "abc")
    for i in range(3):
        tc.put(f"{i:040x}", np.arange(10, dtype=np.uint32), np.zeros(1, np.uint32))
    n, size = tokens.usage(paths.tokens_dir())
    listed = run("list")
    assert f"token cache in {paths.tokens_dir()}: 3 tokenized files, {ctxcache.format_bytes(size)}" in listed.stdout
    cleared = run("clear", "--yes")
    assert cleared.exit_code == 0
    lines = cleared.stdout.strip().splitlines()
    assert lines[0].startswith("freed 1 cached context")
    assert lines[1] == f"freed 3 tokenized files from the token cache, {ctxcache.format_bytes(size)} ({size} bytes)"
    assert tokens.usage(paths.tokens_dir()) == (0, 0)


def test_clear_through_a_linked_entry_frees_nothing_it_did_not_unlink(store, tmp_path):
    outside = ContextCache(tmp_path / "elsewhere")
    key = ContextCache.make_key("m", {}, "x")
    outside.save(key, kv_tensors(), {"model": "m"})
    store.root.mkdir(parents=True)
    (store.root / key).symlink_to(outside.root / key)
    result = run("clear", "--yes")
    assert "freed 1" not in result.stdout
    assert outside.load(key) is not None
