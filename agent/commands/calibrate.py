"""`moba-ask calibrate`: choose a model's citation head weights on needle tasks built from repositories
(keep them apart from the evaluation's), and write them as JSON (ship as agent/heads/<model>.json)."""

from __future__ import annotations

import os

import click

import ingest
from agent.commands import common
from agent.config import RESERVE, AskConfig, SettingError, parse_layers
from agent.evaluate import calibrate as cal
from agent.evaluate.tasks import TaskError, build_workspace
from agent.session import ANSWER_ROUTING_TOKENS
from moba.hf import QA_POLICIES


@click.command("calibrate")
@click.argument("repos", nargs=-1, required=True, metavar="REPO...")
@click.option("-m", "--model", envvar="MOBA_ASK_MODEL",
              help="Catalog name, hub id, local dir or .gguf. [default: $MOBA_ASK_MODEL, else the device default]")
@click.option("--context-tokens", type=click.IntRange(min=256), default=8192, show_default=True,
              help="Context budget per repository (files in pack order while they fit).")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=24, show_default=True,
              help="Questions per repository.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for task choice.")
@click.option("--attention", type=click.Choice(["moba", "dense"]), default="moba", show_default=True,
              help="Attention of the context (calibrate as you will run).")
@click.option("--dense-layers", default="none", show_default=True, metavar="LIST", help="Layers kept dense.")
@click.option("--block-size", type=click.IntRange(min=1), default=AskConfig.block_size, show_default=True)
@click.option("--top-k", type=click.IntRange(min=1), default=AskConfig.top_k, show_default=True)
@click.option("--sink-blocks", type=click.IntRange(min=0), default=AskConfig.sink_blocks, show_default=True)
@click.option("--qa-policy", type=click.Choice(QA_POLICIES), default=AskConfig.qa_policy, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=ANSWER_ROUTING_TOKENS, show_default=True,
              help="Answer tokens (their routing is evidence too, as in use).")
@click.option("--top-heads", default=",".join(map(str, cal.TOP_HEADS)), show_default=True, metavar="LIST",
              help="Head counts to try; the best on the tasks is kept.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--chunk-size", type=click.IntRange(min=1), help="Prefill chunk (1024 CPU, 16384 CUDA).")
@common.rope_yarn_option
@click.option("--include", multiple=True, metavar="GLOB", help="Only pack files matching GLOB. [default: *.py]")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The weights JSON to write.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def calibrate(repos, n_tasks, context_tokens, seed, top_heads, dense_layers, output, quiet, include, exclude, **kw):
    """Find which attention heads point at the code a question is about, for citations.

    Builds needle tasks in each REPO (as `moba-ask eval` does), asks them with per-head capture,
    scores every (layer, head) by how well its evidence ranks the gold block, and writes the best
    heads' weights to OUTPUT; then the heads whose question attention falls on the gold lines, with
    the line selection that cites best with them (kept only when they beat the block heads' lines).
    Citations of the model use agent/heads/<model>.json when it exists
    (agent/heads/<model>@<block size>.json at another --block-size).

    \b
    Examples:
      moba-ask calibrate ~/src/attrs ~/src/click -m smollm2-135m --context-tokens 4096 --tasks 6 -o w.json
      moba-ask calibrate /work/evalrepos/* -m qwen2.5-coder-1.5b --context-tokens 16384 --tasks 40 \\
          -o agent/heads/qwen2.5-coder-1.5b.json
    """
    common.check_paths(repos)
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise click.UsageError(f"the directory of --output does not exist: {out_dir} (create it first)")
    counts = _counts(top_heads)
    try:
        cfg = AskConfig(no_cache=True, dense_layers=parse_layers(dense_layers), **kw)
    except SettingError as e:
        raise click.UsageError(str(e)) from None
    ui = common.Progress(quiet)
    rt, identity = _load(cfg, ui)
    samples = []
    for repo in repos:
        ws = _workspace(repo, rt, ui, context_tokens, n_tasks, seed, include, exclude)
        samples += cal.collect(rt, ws, cfg, open_session=ui.prefill)
    try:
        hw = cal.calibrate(samples, model=rt.name, identity=identity, cfg=cfg, repos=list(repos), top_heads=counts)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    common.write_json(output, hw.to_json())
    m = hw.meta["metrics"]
    click.echo(f"{output}: {len(hw.weights)} heads, signal {hw.signal}, {len(samples)} tasks; block hit@1 "
               f"{m['chosen']['block_hit_at_1']} (every head alike: {m['uniform']['block_hit_at_1']}, "
               f"two-fold: {(m['cross_fold'] or {}).get('block_hit_at_1', 'n/a')})")
    if hw.lines:
        lm = hw.lines.meta["metrics"]

        def rates(r: dict | None) -> str:
            return "n/a" if not r else f"{r['line_precision']} / {r['top1_cite']} / {r['top3_cite']}"

        click.echo(f"  lines: {len(hw.lines.weights)} heads, {hw.lines.selection()}; line precision / top-1 / "
                   f"top-3 {rates(lm['chosen'])} (block heads' lines: {rates(lm['default'])}, two-fold: "
                   f"{rates(lm['cross_fold'])})")
    else:
        click.echo("  lines: no heads beat the block heads' own lines; the default line selection stays")


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise click.UsageError(f"--top-heads must be positive integers like 4,8,16, got {text!r}")
    return counts


def _load(cfg: AskConfig, ui):
    from agent import runtime
    from agent.catalog import ModelError

    try:
        with ui.status("loading model"):
            rt = runtime.load_runtime(cfg)
            c = rt.make_engine(1).config
    except (ModelError, SettingError) as e:
        raise click.ClickException(str(e)) from None
    identity = dict(name=rt.name, num_layers=int(c.num_hidden_layers), num_heads=int(c.num_attention_heads),
                    num_kv_heads=int(getattr(c, "num_key_value_heads", c.num_attention_heads)),
                    hidden_size=int(getattr(c, "hidden_size", 0)))
    return rt, identity


def _workspace(repo, rt, ui, context_tokens, n_tasks, seed, include, exclude):
    if not os.path.isdir(repo):
        raise click.UsageError(f"REPO must be a directory (a repository), got the file {repo}")
    most = rt.max_positions - ANSWER_ROUTING_TOKENS - RESERVE
    if context_tokens > most:
        raise click.UsageError(f"--context-tokens {context_tokens:,} does not fit {rt.name}'s {rt.max_positions:,} "
                               f"positions; use at most {most:,}")
    try:
        with ui.status(f"building tasks in {repo}"):
            return build_workspace(repo, rt.tokenizer, context_tokens=context_tokens, n_tasks=n_tasks, seed=seed,
                                   include=include or ("*.py",), exclude=exclude)
    except (TaskError, ingest.PackError) as e:
        raise click.ClickException(str(e)) from None


