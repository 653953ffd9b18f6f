"""Where moba-ask keeps its files: the cache root and its subdirectories.

The root is ``$MOBA_ASK_CACHE_DIR``, default ``~/.cache/moba-ask`` (``~`` expanded in either). Under it:
``models/`` (pulled and converted models, agent/pull.py), ``contexts/`` (prefilled KV caches,
agent/ctxcache.py), ``tokens/`` (tokenized files, ingest/tokens.py, which is handed the directory) and
``chat_history`` (the readline history of `moba-ask chat`).
This is the only module that reads ``$MOBA_ASK_CACHE_DIR``; it knows nothing of what is stored there.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MOBA_ASK_CACHE_DIR"
DEFAULT_CACHE_ROOT = "~/.cache/moba-ask"


def cache_root() -> Path:
    """``$MOBA_ASK_CACHE_DIR``, default ``~/.cache/moba-ask``; read at every call."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT).expanduser()


def models_dir() -> Path:
    """``<cache root>/models``: one directory per pulled or converted model."""
    return cache_root() / "models"


def contexts_dir() -> Path:
    """``<cache root>/contexts``: the context cache of prefilled KV tensors."""
    return cache_root() / "contexts"


def tokens_dir() -> Path:
    """``<cache root>/tokens``: the token cache of tokenized files."""
    return cache_root() / "tokens"


def chat_history() -> Path:
    """``<cache root>/chat_history``: the readline history of `moba-ask chat`."""
    return cache_root() / "chat_history"
