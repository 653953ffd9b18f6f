"""`moba-ask cache`: list and clear the saved prefilled contexts and the token cache.

Only CLI plumbing: storage, keys and eviction live in agent.ctxcache and ingest.tokens; where, in agent.paths.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone

import click

from agent import paths
from agent.ctxcache import ContextCache, Entry, format_bytes
from ingest import tokens

_HEX = re.compile(r"[0-9a-f]+")


@click.group("cache")
def cache():
    """Manage the context cache: prefilled KV caches saved so that a second question on an
    unchanged repository skips prefill; and the token cache of tokenized files.

    Entries live in $MOBA_ASK_CACHE_DIR/contexts (default ~/.cache/moba-ask/contexts), keyed by
    the model's files, tokenizer, dtype, device, attention settings and packed content. The total
    is capped at $MOBA_ASK_CACHE_MAX_GB GiB (default 20); the least recently used entries go first.
    Tokenized files live in $MOBA_ASK_CACHE_DIR/tokens, capped at 1 GiB.

    \b
    Examples:
      moba-ask cache list
      moba-ask cache list --json
      moba-ask cache clear 3fa9c2 --yes
      moba-ask cache clear
    """


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_cmd(as_json: bool):
    """Show the saved contexts, most recently used first.

    \b
    Examples:
      moba-ask cache list
      moba-ask cache list --json | jq '.[] | {key, model, size_bytes}'
    """
    store = _open()
    entries = sorted(store.entries(), key=lambda e: e.last_used or 0.0, reverse=True)
    if as_json:
        click.echo(json.dumps([_row(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"the context cache in {store.root} is empty", err=True)
    else:
        _print_table(store, entries)
    n, size = tokens.usage(paths.tokens_dir())
    if n:
        click.echo(f"token cache in {paths.tokens_dir()}: {n:,} tokenized files, {format_bytes(size)} "
                   f"of {format_bytes(tokens.TOKEN_CACHE_MAX_BYTES)}")


@cache.command("clear")
@click.argument("key_prefix", required=False)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def clear_cmd(key_prefix: str | None, yes: bool):
    """Delete the saved context whose key starts with KEY_PREFIX, or all of them.

    KEY_PREFIX is the start of a key from `moba-ask cache list`; it must match exactly one entry.

    \b
    Examples:
      moba-ask cache clear            # everything, after a prompt
      moba-ask cache clear 3fa9c2     # one entry
      moba-ask cache clear --yes      # no prompt (scripts)
    """
    store = _open()
    targets = store.entries() if key_prefix is None else [_match(store, key_prefix)]
    token_files, token_bytes = tokens.usage(paths.tokens_dir()) if key_prefix is None else (0, 0)
    if not targets and not token_files:
        click.echo(f"the context cache in {store.root} is empty; nothing to clear", err=True)
        return
    size = format_bytes(sum(e.size for e in targets))
    what = f"{len(targets)} cached context{'s' * (len(targets) != 1)} ({size}) from {store.root}"
    if token_files:
        what += f" and {token_files:,} tokenized files ({format_bytes(token_bytes)}) from {paths.tokens_dir()}"
    if not yes:
        click.confirm(f"Delete {what}?", abort=True, err=True)
    try:
        removed, freed = store.clear() if key_prefix is None else store.clear(targets[0].key)
    except OSError as e:
        raise click.ClickException(
            f"cannot delete from {store.root}: {e.strerror or e}; check its permissions"
        ) from None
    click.echo(f"freed {removed} cached context{'s' * (removed != 1)}, {format_bytes(freed)} ({freed} bytes)")
    if token_files:
        n, tfreed = tokens.clear(paths.tokens_dir())
        click.echo(f"freed {n} tokenized file{'s' * (n != 1)} from the token cache, {format_bytes(tfreed)} "
                   f"({tfreed} bytes)")


def _open() -> ContextCache:
    try:
        return ContextCache()
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _match(store: ContextCache, prefix: str) -> Entry:
    prefix = prefix.lower()
    if not _HEX.fullmatch(prefix):
        raise click.ClickException(
            f"KEY_PREFIX must be hex digits from `moba-ask cache list`, got {prefix!r}"
        )
    hits = [e for e in store.entries() if e.key.startswith(prefix)]
    if not hits:
        raise click.ClickException(f"no cached context has a key starting with {prefix!r}; "
                                   "`moba-ask cache list` shows the keys")
    if len(hits) > 1:
        raise click.ClickException(f"{len(hits)} cached contexts have keys starting with {prefix!r}; "
                                   "give more characters of the key")
    return hits[0]


def _row(e: Entry) -> dict:
    return {
        "key": e.key,
        "model": e.model,
        "root": e.source,
        "tokens": e.tokens,
        "size_bytes": e.size,
        "created": _iso(e.created),
        "last_used": _iso(e.last_used),
        "ok": e.ok,
        "path": str(e.path),
    }


def _print_table(store: ContextCache, entries: list[Entry]) -> None:
    from rich.console import Console
    from rich.table import Table

    total = sum(e.size for e in entries)
    limit = format_bytes(store.max_bytes)
    table = Table(title=f"context cache in {store.root}: {format_bytes(total)} of {limit}")
    for col, justify in (("key", "left"), ("model", "left"), ("root", "left"), ("tokens", "right"),
                         ("size", "right"), ("last used", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    now = time.time()
    for e in entries:
        model = e.model or ("-" if e.ok else "corrupt (rebuilt on next use)")
        tokens = f"{e.tokens:,}" if isinstance(e.tokens, int) else "-"
        size = format_bytes(e.size)
        table.add_row(e.key[:12], model, e.source or "-", tokens, size, _ago(e.last_used, now))
    Console(soft_wrap=False).print(table)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    s = max(0.0, now - t)
    day = 86400
    for limit, unit, div in ((60, "s", 1), (3600, "min", 60), (day, "h", 3600), (30 * day, "days", day)):
        if s < limit:
            return "just now" if unit == "s" and s < 5 else f"{s // div:.0f} {unit} ago"
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d")
