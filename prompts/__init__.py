"""Prompt templates for moba-ask, stored as package data (*.md). `load(name)` returns the text.

Templates use str.format fields only. They know nothing of tokenizers or models.
"""

from __future__ import annotations

from importlib import resources

NAMES = ("system", "ask", "chat", "summarize")


def load(name: str) -> str:
    """The text of template `name` (one of NAMES), without its trailing newline.

    Raises:
        KeyError: for an unknown name, listing the known ones.
    """
    if name not in NAMES:
        raise KeyError(f"unknown prompt {name!r}; known: {', '.join(NAMES)}")
    return resources.files(__package__).joinpath(f"{name}.md").read_text(encoding="utf-8").rstrip("\n")
