"""Read one candidate file into text, or say why it is skipped.

Order of checks: secret by name (the path in the pack and the file's real name), binary by
extension, a secret token inside the name, regular file (os.stat, then fstat after an O_NONBLOCK
open: FIFOs, devices, sockets and /proc, /sys, /dev are never read), size cap (at most cap + 1
bytes are read, whatever the size the file claims), then the bytes: UTF-16 BOM, NUL-byte probe,
UTF-8 decode. Text that is not UTF-8 (and not binary-looking) is decoded with U+FFFD replacement
and flagged "non_utf8". Line endings become "\\n"; a UTF-8 BOM is dropped. Notebooks (.ipynb)
become their markdown and code cells (outputs optional); PDFs become their page texts with
`--- page N ---` markers (pypdf). Secret values in the final text (file, notebook cells or PDF
pages alike) are redacted in place by `ingest.secrets`.

It knows nothing about tokens, ordering or rendering.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
from dataclasses import dataclass

from ingest import rules, secrets
from ingest.records import MAX_FILE_BYTES_LIMIT, PackOptions

RAW_FACTOR = 64
_TEXT_CONTROL = set(b"\t\n\r\f\v\b\x1b")
_READ_CHUNK = 1 << 20


class Skip(Exception):
    """Raised with the reason a file is skipped."""


@dataclass(frozen=True)
class Text:
    """A file read for packing: its text, flags, size on disk, and the secrets redacted in it."""

    text: str
    flags: tuple[str, ...]
    size: int
    redacted: tuple[tuple[int, str], ...] = ()


def read(abs_path: str, rel: str, options: PackOptions) -> Text:
    """The text of one file. Raises Skip(reason) when it must be left out, OSError when unreadable."""
    _check_name(abs_path, rel, options)
    ext = rel.rsplit(".", 1)[-1].lower() if "." in rel.rsplit("/", 1)[-1] else ""
    document = ext in ("ipynb", "pdf")
    cap = min(options.max_file_bytes * RAW_FACTOR, MAX_FILE_BYTES_LIMIT) if document else options.max_file_bytes
    data = read_regular(abs_path, cap)
    if ext == "pdf":
        text, flags = _pdf(data, options.max_file_bytes), ("pdf",)
    else:
        text, flags = _decode(data, ext, options)
    if document and len(text.encode("utf-8", "replace")) > options.max_file_bytes:
        raise Skip(f"extracted text larger than the size cap ({_mb(options.max_file_bytes)}); "
                   "raise --max-file-bytes")
    if options.allow_secrets:
        return Text(text, flags, len(data))
    text, hits = secrets.redact(text)
    return Text(text, (*flags, "redacted") if hits else flags, len(data), tuple(hits))


def _check_name(abs_path: str, rel: str, options: PackOptions) -> None:
    if not options.allow_secrets and rules.secret_name(rel, os.path.realpath(abs_path)):
        raise Skip("looks like a secret (file name); pass --allow-secrets to include it")
    category = rules.binary_extension(rel)
    if category:
        raise Skip(f"binary ({category})")
    if not options.allow_secrets:
        kind = secrets.find(rel)
        if kind:
            raise Skip(f"looks like a secret ({kind} in the file name); pass --allow-secrets to include it")


def read_regular(path: str, cap: int) -> bytes:
    """At most cap bytes of a regular file. Raises Skip for anything else or a larger file."""
    real = os.path.realpath(path)
    reason = rules.pseudo_fs_reason(real)
    if reason:
        raise Skip(reason)
    _require_regular(os.stat(real).st_mode)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        _require_regular(st.st_mode)
        if st.st_size > cap:
            raise Skip(_over_cap(_mb(st.st_size), cap))
        chunks, total = [], 0
        while total <= cap:
            chunk = f.read(min(_READ_CHUNK, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    if total > cap:
        raise Skip(_over_cap("more", cap))
    return b"".join(chunks)


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise Skip(f"not a regular file ({_kind(mode)})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _over_cap(size: str, cap: int) -> str:
    more = "" if cap >= MAX_FILE_BYTES_LIMIT else "; raise --max-file-bytes"
    return f"larger than the size cap ({size} > {_mb(cap)}){more}"


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
        return _cells(json.loads(text)["cells"], outputs)
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise Skip("invalid notebook JSON") from None


def _cells(cells: list, outputs: bool) -> str:
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


def _pdf(data: bytes, max_chars: int) -> str:
    import pypdf

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Skip("encrypted PDF")
        pages, total = [], 0
        for page in reader.pages:
            pages.append((page.extract_text() or "").rstrip("\n"))
            total += len(pages[-1])
            if total > max_chars:
                raise Skip(f"extracted text larger than the size cap ({_mb(max_chars)}); raise --max-file-bytes")
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"unreadable PDF ({type(e).__name__})") from None
    return "".join(f"--- page {i} ---\n{t}\n" if t else f"--- page {i} ---\n" for i, t in enumerate(pages, 1))
