"""Fixtures for ingest tests: the tiny tokenizer, a private token cache dir, a pack helper."""

from __future__ import annotations

import pytest

import ingest
from tests.ingest.fixtures import make_tokenizer


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture
def cache_dir(tmp_path_factory):
    """A private token cache directory outside any fixture tree (not created)."""
    return tmp_path_factory.mktemp("cache") / "tokens"


@pytest.fixture
def run_pack(tok, cache_dir):
    """run_pack(paths, **PackOptions fields) -> Pack with the tiny tokenizer; the token cache is
    `cache_dir` unless token_cache is given."""

    def run(paths, **kw):
        return ingest.pack(paths, tok, ingest.PackOptions(**{"token_cache": cache_dir, **kw}))

    return run
