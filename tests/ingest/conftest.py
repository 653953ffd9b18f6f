"""Fixtures for ingest tests: the tiny tokenizer, a private token cache dir, a pack helper."""

from __future__ import annotations

import pytest

import ingest
from tests.ingest.fixtures import make_tokenizer


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """Every test gets its own token cache outside any fixture tree."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(path))
    return path / "tokens"


@pytest.fixture
def run_pack(tok):
    """run_pack(paths, **PackOptions fields) -> Pack with the tiny tokenizer."""

    def run(paths, **kw):
        return ingest.pack(paths, tok, ingest.PackOptions(**kw))

    return run
