"""Read one candidate file into text, or say why it is skipped.

Order of checks: secret by name, binary by extension, size cap, then the bytes: UTF-16 BOM, NUL-byte
probe, secret content patterns, UTF-8 decode. Text that is not UTF-8 (and not binary-looking) is
decoded with U+FFFD replacement and flagged "non_utf8". Line endings become "\\n"; a UTF-8 BOM is
dropped. Notebooks (.ipynb) become their markdown and code cells (outputs optional); PDFs become
their page texts with `--- page N ---` markers (pypdf).

It knows nothing about tokens, ordering or rendering.
"""

from __future__ import annotations

import io
import json
import logging
import os

from ingest import rules
from ingest.records import PackOptions

RAW_FACTOR = 64
_TEXT_CONTROL = set(b"\t\n\r\f\v\b\x1b")


class Skip(Exception):
    """Raised with the reason a file is skipped."""


def read(abs_path: str, rel: str, options: PackOptions) -> tuple[str, tuple[str, ...], int]:
    """(text, flags, size in bytes) of one file. Raises Skip(reason) when it must be left out."""
    if not options.allow_secrets and rules.secret_name(rel):
        raise Skip("looks like a secret (file name); pass --allow-secrets to include it")
    category = rules.binary_extension(rel)
    if category:
        raise Skip(f"binary ({category})")
    ext = rel.rsplit(".", 1)[-1].lower() if "." in rel.rsplit("/", 1)[-1] else ""
    size = os.path.getsize(abs_path)
    cap = options.max_file_bytes * (RAW_FACTOR if ext in ("ipynb", "pdf") else 1)
    if size > cap:
        raise Skip(f"larger than the size cap ({_mb(size)} > {_mb(cap)}); raise --max-file-bytes")
    with open(abs_path, "rb") as f:
        data = f.read()
    if ext == "pdf":
        text, flags = _pdf(data), ("pdf",)
    else:
        text, flags = _decode(data, ext, options)
    if ext in ("ipynb", "pdf") and len(text.encode("utf-8", "replace")) > options.max_file_bytes:
        raise Skip(f"extracted text larger than the size cap ({_mb(options.max_file_bytes)}); "
                   "raise --max-file-bytes")
    return text, flags, size


def _mb(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _decode(data: bytes, ext: str, options: PackOptions) -> tuple[str, tuple[str, ...]]:
    flags: tuple[str, ...] = ()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        text, flags = data.decode("utf-16", errors="replace"), ("utf16",)
    elif b"\0" in data:
        raise Skip("binary (NUL bytes)")
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            if _looks_binary(data):
                raise Skip("binary (not text)") from None
            text, flags = data.decode("utf-8", errors="replace"), ("non_utf8",)
    if not options.allow_secrets:
        hit = rules.secret_content(text.encode("utf-8", "replace") if flags else data)
        if hit:
            raise Skip(f"looks like a secret ({hit}); pass --allow-secrets to include it")
    text = text.removeprefix("\ufeff")
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if ext == "ipynb":
        return _notebook(text, options.notebook_outputs), (*flags, "notebook")
    return text, flags


def _looks_binary(data: bytes) -> bool:
    probe = data[:8192]
    controls = sum(1 for b in probe if b < 32 and b not in _TEXT_CONTROL)
    return controls > len(probe) * 0.1


def _notebook(text: str, outputs: bool) -> str:
    try:
        cells = json.loads(text)["cells"]
    except (ValueError, KeyError, TypeError):
        raise Skip("invalid notebook JSON") from None
    parts = []
    for cell in cells:
        kind = cell.get("cell_type", "code")
        source = _joined(cell.get("source", ""))
        parts.append(f"# %% [{kind}]\n{source}" if kind != "code" else f"# %%\n{source}")
        if outputs and kind == "code":
            parts += [f"# %% [output]\n{t}" for t in _outputs(cell)]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n" if parts else ""


def _joined(source) -> str:
    return "".join(source) if isinstance(source, list) else str(source)


def _outputs(cell: dict) -> list[str]:
    out = []
    for o in cell.get("outputs", []):
        text = o.get("text") or o.get("data", {}).get("text/plain")
        if text:
            out.append(_joined(text))
    return out


def _pdf(data: bytes) -> str:
    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Skip("encrypted PDF")
        pages = [(p.extract_text() or "").rstrip("\n") for p in reader.pages]
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"unreadable PDF ({type(e).__name__})") from None
    return "".join(f"--- page {i} ---\n{t}\n" if t else f"--- page {i} ---\n" for i, t in enumerate(pages, 1))
