"""`moba-ask pack`: pack paths into one context and report files, tokens, skipped and dropped files.

Only CLI plumbing: packing lives in `ingest`, tokenizer loading (a model's, or a bare tokenizer.json)
in `agent.load`, imported when a command runs. Summary and progress go to stderr; the packed text
(`-o -`) or the JSON report (`--json`) go to stdout.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import click

import ingest
from agent.catalog import ModelError
from agent.commands.progress import track
from agent.paths import tokens_dir
from agent.render import SHOW, budget_lines, pack_notes
from ingest.records import DEFAULT_MAX_FILE_BYTES, MAX_FILE_BYTES_LIMIT
from ingest.render import display_path
from ingest.tokens import backend_of
from ingest.walk import resolve_paths

DEFAULT_MODEL = "qwen2.5-coder-1.5b"


@click.command("pack")
@click.argument("paths", nargs=-1, required=True)
@click.option("-m", "--model", default=lambda: os.environ.get("MOBA_ASK_MODEL") or DEFAULT_MODEL,
              show_default="$MOBA_ASK_MODEL or " + DEFAULT_MODEL,
              help="Model whose tokenizer counts tokens: catalog name, HF dir, .gguf, or a tokenizer.json.")
@click.option("--max-tokens", type=click.IntRange(min=0), default=0,
              help="Token budget; files that do not fit go in as outlines (signatures), then are dropped. "
                   "0: no budget (pack counts for no model window; ask uses the model's). [default: 0]")
@click.option("--include", multiple=True, metavar="GLOB", help="Only pack files matching GLOB (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB (repeatable).")
@click.option("--no-line-numbers", is_flag=True, help="Do not prefix lines with their numbers.")
@click.option("--max-file-bytes", type=click.IntRange(min=1, max=MAX_FILE_BYTES_LIMIT), default=DEFAULT_MAX_FILE_BYTES, show_default=True,
              help="Skip files larger than this (for .ipynb/.pdf: extracted text).")
@click.option("--no-drop", is_flag=True, help="Fail instead of outlining or dropping files when over --max-tokens.")
@click.option("--allow-secrets", is_flag=True, help="Pack files that look like secrets (.env, keys, ...).")
@click.option("--no-default-excludes", is_flag=True, help="Keep lockfiles, vendored and build dirs, ...")
@click.option("--notebook-outputs", is_flag=True, help="Include text outputs of notebook cells.")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the token cache.")
@click.option("-o", "--output", metavar="FILE", help="Write the packed text to FILE ('-' for stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
def pack(paths, model, max_tokens, include, exclude, no_line_numbers, max_file_bytes, no_drop, allow_secrets,
         no_default_excludes, notebook_outputs, no_cache, output, as_json, quiet):
    """Pack PATH... (directories, files) into one context and count its tokens.

    Git work trees use git's file list (.gitignore honoured); .mobaignore files and the globs
    adjust it. Without -o nothing is written: the summary on stderr is the answer.

    \b
    Examples:
      moba-ask pack .                              # summary: files, tokens, largest, skipped
      moba-ask pack src/ README.md -o context.txt
      moba-ask pack . --max-tokens 100000 --json | jq '.dropped'
      moba-ask pack . --exclude 'tests/' -o - | less
      moba-ask pack . -m ./tokenizer.json
    """
    if as_json and output == "-":
        raise click.UsageError("-o - and --json both write to stdout; pick one")
    options = ingest.PackOptions(
        max_tokens=max_tokens or None, include=include, exclude=(*exclude, *_self_exclude(paths, output)),
        line_numbers=not no_line_numbers, max_file_bytes=max_file_bytes, drop=not no_drop,
        allow_secrets=allow_secrets, default_excludes=not no_default_excludes,
        notebook_outputs=notebook_outputs, token_cache=None if no_cache else tokens_dir())
    tokenizer = _tokenizer(model)
    start = time.perf_counter()
    result = _run(paths, tokenizer, options, quiet)
    if output:
        _write(output, result.text)
    if as_json:
        click.echo(json.dumps(report(result), indent=1))
    if not quiet:
        _summary(result, max_tokens, time.perf_counter() - start)


def _tokenizer(name: str):
    """agent.load.load_tokenizer, checked to be fast (ingest needs its Rust backend); ClickException on failure."""
    from agent.load import load_tokenizer

    try:
        tok = load_tokenizer(name)
        backend_of(tok)
    except (ModelError, OSError, ValueError, TypeError) as e:  # TypeError: not a fast tokenizer (backend_of)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise click.ClickException(msg if name in msg else f"cannot load the tokenizer of '{name}': {msg}") from None
    return tok


def _self_exclude(paths, output) -> tuple[str, ...]:
    if not output or output == "-":
        return ()
    try:
        root = resolve_paths(list(paths))[0]
    except ingest.PackError:
        return ()
    out = os.path.abspath(output)
    if os.path.commonpath([root, out]) != root:
        return ()
    return ("/" + Path(os.path.relpath(out, root)).as_posix(),)


def _run(paths, tokenizer, options, quiet: bool) -> ingest.Pack:
    from rich.console import Console

    try:
        with track(Console(stderr=True, soft_wrap=True), "packing", "files", quiet) as update:
            return ingest.pack(list(paths), tokenizer, options, progress=update)
    except ingest.PackError as e:
        raise click.ClickException(str(e)) from None


def _write(output: str, text: str) -> None:
    if output == "-":
        click.echo(text, nl=False)
        return
    target = os.path.abspath(output)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".moba-pack-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None


def report(p: ingest.Pack) -> dict:
    """The `--json` report of a pack."""
    return {
        "total_tokens": p.total_tokens,
        "root": p.root,
        "content_hash": p.content_hash,
        "files": [{"path": f.path, "tokens": f.tokens, "token_start": f.token_start, "token_end": f.token_end,
                   "lines": f.lines, "flags": list(f.flags)} for f in p.files],
        "skipped": [{"path": path, "reason": reason} for path, reason in p.skipped],
        "outlined": [{"path": path, "tokens": n, "full_tokens": full, "reason": reason}
                     for path, n, full, reason in p.outlined],
        "dropped": [{"path": path, "tokens": n, "reason": reason} for path, n, reason in p.dropped],
        "redacted": [{"path": path, "line": line, "kind": kind} for path, line, kind in p.redacted],
        "notes": list(p.notes),
    }


def _summary(p: ingest.Pack, max_tokens: int | None, seconds: float) -> None:
    budget = f" of {max_tokens:,} allowed" if max_tokens else ""
    outlines = f" ({len(p.outlined):,} as outlines)" if p.outlined else ""
    lines = [f"packed {len(p.files):,} files{outlines}, {p.total_tokens:,} tokens{budget} from {display_path(p.root)} "
             f"in {seconds:.2f} s (tree {p.tree_tokens:,} tokens)", "largest files:"]
    lines += [f"  {f.tokens:>9,}  {f.path}" for f in sorted(p.files, key=lambda f: -f.tokens)[:5]]
    flagged = [f for f in p.files if "non_utf8" in f.flags]
    if flagged:
        lines.append(f"decoded with replacement characters (not UTF-8): {', '.join(f.path for f in flagged[:SHOW])}")
    lines += pack_notes(p)
    lines += _skipped(p.skipped)
    lines += budget_lines(p)
    click.echo("\n".join(lines), err=True)


def _skipped(skipped) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    rows = []
    for reason, paths in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" (+{len(paths) - 3} more)" if len(paths) > 3 else ""
        rows.append(f"  {reason}: {', '.join(paths[:3])}{more}")
    return [f"skipped {len(skipped)}:", *rows] if rows else []
