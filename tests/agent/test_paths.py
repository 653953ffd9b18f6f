"""agent.paths: the one reader of $MOBA_ASK_CACHE_DIR, and the directories every cache takes from it."""

from pathlib import Path

from agent import paths
from agent.ctxcache import ContextCache


def test_root_from_the_environment_with_home_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", "~/elsewhere")
    assert paths.cache_root() == tmp_path / "elsewhere"
    assert paths.tokens_dir() == tmp_path / "elsewhere" / "tokens"
    monkeypatch.delenv("MOBA_ASK_CACHE_DIR")
    assert paths.cache_root() == Path.home() / ".cache" / "moba-ask" == tmp_path / ".cache" / "moba-ask"
    assert paths.models_dir() == tmp_path / ".cache" / "moba-ask" / "models"


def test_the_caches_live_under_the_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path))
    assert ContextCache().root == paths.contexts_dir() == tmp_path / "contexts"
    assert paths.chat_history() == tmp_path / "chat_history"
