"""`moba-ask eval`: needle questions and citation accuracy on a Python repository, full attention vs
MoBA, with one loaded model, one packed context and one prefill per attention config."""

from __future__ import annotations

import json
import os
import time

import click

import ingest
from agent.commands import common
from agent.config import AskConfig, SettingError, parse_layers
from agent.engine import MemoryBudgetError
from agent.evaluate import runner
from agent.evaluate.tasks import TaskError, build_workspace


@click.command("eval")
@click.argument("path")
@click.option("-m", "--model", envvar="MOBA_ASK_MODEL",
              help="Catalog name, hub id, local dir or .gguf. [default: $MOBA_ASK_MODEL, else the device default]")
@click.option("--context-tokens", type=click.IntRange(min=256), default=8192, show_default=True,
              help="Context budget: the repository's files are taken in pack order while they fit.")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=12, show_default=True,
              help="Questions: about 2/3 find-the-function needles, 1/3 class/constant definitions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for task choice and the random baseline.")
@click.option("--attention", "configs", default=",".join(runner.CONFIG_NAMES), show_default=True, metavar="LIST",
              help="Comma list of configs: dense (exact SDPA, gate still scored), moba-hybrid (MoBA, "
                   "--hybrid-layers dense), moba (MoBA in every layer).")
@click.option("--hybrid-layers", default="last3", show_default=True, metavar="LIST",
              help="Dense layers of moba-hybrid: '-3,-2,-1' or 'last3'.")
@click.option("--block-size", type=click.IntRange(min=1), default=AskConfig.block_size, show_default=True,
              help="MoBA key block size.")
@click.option("--top-k", type=click.IntRange(min=1), default=AskConfig.top_k, show_default=True,
              help="Blocks per query, own block included.")
@click.option("--sink-blocks", type=click.IntRange(min=0), default=AskConfig.sink_blocks, show_default=True,
              help="Leading blocks every query attends.")
@click.option("--qa-policy", type=click.Choice(["moba", "dense"]), default="moba", show_default=True,
              help="Attention for the question and answer tokens.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Longest answer.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="[default: float32 on CPU, bfloat16 on CUDA]")
@click.option("--chunk-size", type=click.IntRange(min=1), help="Prefill chunk (1024 CPU, 16384 CUDA).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only pack files matching GLOB. [default: *.py, so that the context is code]")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB.")
@click.option("--json", "as_json", is_flag=True, help="Print {configs, tasks} as JSON instead of tables.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON document to FILE.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
def eval_cmd(path, n_tasks, context_tokens, seed, configs, hybrid_layers, as_json, output, quiet, include,
             exclude, **kw):
    """Score answers and citations on needle questions built from the Python repository at PATH.

    Functions with docstrings are picked evenly through the packed context; their docstrings are
    removed from a temp copy (PATH is never written) and become the questions ("which function
    does this?"); a third of the questions ask where a class or constant is defined. Each
    attention config prefills the context once and answers every question. Scores: answer exact
    match, the RepoQA rule (BLEU >= 0.8), gold-file hit@1/hit@3/MRR and line precision/recall of the
    citations, bogus citations (must be 0), and the BM25 and random-file baselines.

    \b
    Examples:
      moba-ask eval ~/src/attrs --model smollm2-135m --context-tokens 4096 --tasks 12
      moba-ask eval . --attention dense,moba --block-size 512 --top-k 3 --json > eval.json
      moba-ask eval . --model qwen2.5-coder-1.5b --context-tokens 16384 --tasks 6 -o run.json
    """
    common.check_paths([path])
    if output:
        common.check_writable(output, "-o")
    if not os.path.isdir(path):
        raise click.UsageError(f"PATH must be a directory (a repository), got the file {path}")
    try:
        names = runner.parse_configs(configs)
        layers = parse_layers(hybrid_layers)
        cfg = AskConfig(no_cache=True, **kw)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    ui = common.Progress(quiet)
    rt = _load(cfg, ui)
    _check_fit(rt, cfg, context_tokens)
    ws = _workspace(path, rt, ui, context_tokens, n_tasks, seed, include, exclude)
    try:
        report = runner.run(rt, ws, cfg, names, seed=seed, hybrid_layers=layers, open_session=ui.prefill,
                            on_task=_QuestionBar(ui))
    except MemoryBudgetError as e:
        raise click.ClickException(str(e)) from None
    if output:
        try:
            with open(output, "w", encoding="utf-8") as f:
                json.dump({**report.doc, "meta": report.meta}, f, indent=1)
        except OSError as e:
            raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from None
    if as_json:
        click.echo(json.dumps(report.doc, indent=1))
    else:
        click.echo(runner.to_markdown(report), nl=False)


def _load(cfg: AskConfig, ui):
    from agent.models import ModelError

    try:
        with ui.status("loading model"):
            return common.load_runtime(cfg)
    except (ModelError, SettingError) as e:
        raise click.ClickException(str(e)) from None


def _check_fit(rt, cfg: AskConfig, context_tokens: int) -> None:
    most = rt.max_positions - cfg.max_new_tokens - common.RESERVE
    if most < 256:  # the smallest --context-tokens
        raise click.UsageError(f"--max-new-tokens {cfg.max_new_tokens:,} leaves no room for a context in "
                               f"{rt.name}'s {rt.max_positions:,} positions; use at most "
                               f"{rt.max_positions - common.RESERVE - 256:,}")
    if context_tokens > most:
        raise click.UsageError(f"--context-tokens {context_tokens:,} does not fit {rt.name}'s {rt.max_positions:,} "
                               f"positions with the prompt and answer; use at most {most:,}")


def _workspace(path, rt, ui, context_tokens, n_tasks, seed, include, exclude):
    try:
        with ui.status("building tasks (packing PATH, stripping docstrings in a temp copy)"):
            ws = build_workspace(path, rt.tokenizer, context_tokens=context_tokens, n_tasks=n_tasks, seed=seed,
                                 include=include or ("*.py",), exclude=exclude)
    except (TaskError, ingest.PackError) as e:
        raise click.ClickException(str(e)) from None
    kinds = ", ".join(f"{sum(t.kind == k for t in ws.tasks)} {k}" for k in ("function", "class", "constant"))
    ui.console.print(f"{len(ws.tasks)} tasks ({kinds}) over {len(ws.pack.files)} files, "
                     f"{ws.pack.total_tokens:,} tokens", highlight=False)
    return ws


class _QuestionBar:
    """on_task callback: one transient rich bar per config (opened after its prefill), and a note
    with the time taken when the config is done."""

    def __init__(self, ui):
        self.ui, self.bar, self.task, self.t0 = ui, None, None, 0.0

    def __call__(self, name: str, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.bar is None:
            self.t0 = time.perf_counter()
            disable = self.ui.quiet or not self.ui.console.is_terminal
            self.bar = Progress(TextColumn(f"{name}: questions"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), console=self.ui.console, transient=True, disable=disable)
            self.bar.__enter__()
            self.task = self.bar.add_task("", total=total)
        self.bar.update(self.task, completed=done)
        if done >= total:
            self.bar.__exit__(None, None, None)
            self.bar = None
            self.ui.console.print(f"{name}: {total} questions in {time.perf_counter() - self.t0:.1f}s", highlight=False)
