"""`moba-ask eval`: needle, definition and caller questions and citation accuracy on one or more
Python repositories at one or more context sizes, dense attention vs MoBA configs, with one loaded
model and one prefill per repository, size and config."""

from __future__ import annotations

import json
import os
from functools import partial

import click

import ingest
from agent.commands import common
from agent.commands.progress import Ticker
from agent.config import RESERVE, AskConfig, SettingError
from agent.engine import MemoryBudgetError
from agent.evaluate import report as rep
from agent.evaluate import runner
from agent.evaluate.configs import parse_specs
from agent.evaluate.evidence import EvidenceLog
from agent.evaluate.tasks import KINDS, TaskError, build_workspace
from agent.parallel import leader
from moba.hf import QA_POLICIES

DEFAULT_CONFIGS = "dense,moba,moba:qa=dense"
PROGRESS_EVERY_S = 10.0  # questions take seconds each; one line per 10 s is enough


@click.command("eval")
@click.argument("paths", nargs=-1, required=True, metavar="REPO [REPO ...]")
@click.option("-m", "--model", envvar="MOBA_ASK_MODEL",
              help="Catalog name, hub id, local dir or .gguf. [default: $MOBA_ASK_MODEL, else the device default]")
@click.option("--context-tokens", "sizes", default="8192", show_default=True, metavar="N[,N...]",
              help="Context budget(s), e.g. 16384,30000: each repository is packed at each size (its files "
                   "in pack order while they fit).")
@click.option("--tasks", "n_tasks", type=click.IntRange(min=1), default=12, show_default=True,
              help="Questions in all, split evenly over the repositories (per size): about 1/2 find-the-function "
                   "needles, 1/4 class/constant definitions, 1/4 'which function calls X'.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed for task choice, the random baseline and the bootstrap.")
@click.option("--attention", "configs", default=DEFAULT_CONFIGS, show_default=True, metavar="LIST",
              help="Comma list of configs: dense, moba, moba-hybrid (= moba:dense=last3) or moba:KEY=VALUE+... "
                   "with keys qa (moba|dense), dense (layers: last3, first2, first2,last2, none, -1...), block, "
                   "topk, sinks, local, sub. Unset keys take the flags below.")
@click.option("--block-size", type=click.IntRange(min=1), default=AskConfig.block_size, show_default=True,
              help="MoBA key block size (base).")
@click.option("--top-k", type=click.IntRange(min=1), default=AskConfig.top_k, show_default=True,
              help="Blocks per query, own block included (base).")
@click.option("--sink-blocks", type=click.IntRange(min=0), default=AskConfig.sink_blocks, show_default=True,
              help="Leading blocks every query attends (base).")
@click.option("--qa-policy", type=click.Choice(QA_POLICIES), default=AskConfig.qa_policy, show_default=True,
              help="Attention for the question and answer tokens (base).")
@click.option("--head-weights", metavar="FILE|uniform",
              help="Citation head weights: a file from `moba-ask calibrate`, or 'uniform'. [default: the model's "
                   "shipped weights, else uniform with a note]")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Longest answer; generation also stops at the end-of-turn token.")
@click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available]")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Full-precision weights in this dtype. [default: int8 weights on CPU (bf16 activations where the CPU "
                          "has bf16, else fp32), bfloat16 on CUDA]")
@click.option("--chunk-size", type=click.IntRange(min=1), help="Prefill chunk (1024 CPU, 16384 CUDA).")
@common.rope_yarn_option
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only pack files matching GLOB. [default: *.py, so that the context is code]")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document instead of tables.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
              help="Also write the JSON document to FILE, rewritten after each repository and size is done "
                   "(meta.complete is false until the end), so that a run cut short keeps what it measured.")
@click.option("--evidence", type=click.Path(dir_okay=False, writable=True), metavar="FILE.npz",
              help="Also save each MoBA answer's routing evidence (citation score per key block, key mass per "
                   "token) and the source maps, rewritten after each repository and size, so that citation "
                   "settings can be re-scored without the model (python -m bench.cite_rescore).")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
def eval_cmd(paths, n_tasks, sizes, seed, configs, as_json, output, quiet, include, exclude, evidence, **kw):
    """Score answers and citations on questions built from the Python repositories REPO ...

    Functions with docstrings are picked evenly through each packed context; their docstrings are
    removed from a temp copy (REPO is never written) and become the questions ("which function
    does this?"); a quarter ask where a class or constant is defined, a quarter which function
    calls a given one (the one caller, in another file, read from the AST). Each attention config
    prefills each repository's context once and answers its questions. Rates (answer names the
    gold, gold-file hit@1/hit@3, top-1/top-3 routing citation on the gold lines, line precision,
    BM25 and random baselines) come with bootstrap 95% intervals over the tasks of all
    repositories, and each config other than dense with its paired difference against dense.

    \b
    Examples:
      moba-ask eval ~/src/attrs --model smollm2-135m --context-tokens 4096 --tasks 12
      moba-ask eval ~/src/flask ~/src/lark --context-tokens 16384,30000 --tasks 150 -o run.json
      moba-ask eval . --attention dense,moba:qa=dense+dense=last3,moba:block=512+topk=3 --json
    """
    common.check_paths(list(paths))
    if output:
        common.check_writable(output, "-o")
    if evidence:
        common.check_writable(evidence, "--evidence")
        if not evidence.endswith(".npz"):
            raise click.UsageError(f"--evidence must name a .npz file, got {evidence}")
    for path in paths:
        if not os.path.isdir(path):
            raise click.UsageError(f"REPO must be a directory (a repository), got the file {path}")
    try:
        specs = parse_specs(configs)
        budgets = _sizes(sizes)
        cfg = AskConfig(no_cache=True, **kw)
        common.check_head_weights(cfg.head_weights)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    ui = common.Progress(quiet)
    rt = _load(cfg, ui)
    for size in budgets:
        _check_fit(rt, cfg, size)
    units = _units(list(paths), budgets, rt, ui, n_tasks, seed, include, exclude)
    try:
        doc = _run(rt, units, cfg, specs, seed, ui, output, evidence)
    except (MemoryBudgetError, SettingError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(doc, indent=1))
    else:
        click.echo(rep.to_markdown(doc), nl=False)


def _run(rt, units, cfg: AskConfig, specs, seed: int, ui, output: str | None, evidence: str | None = None) -> dict:
    """Ask everything; the document, also written to `output` (and the evidence to `evidence`) after each
    unit and at the end."""
    meta = dict(model=rt.name, configs=[_config_meta(s, cfg) for s in specs], repos=[_unit_meta(u) for u in units],
                max_new_tokens=cfg.max_new_tokens, head_weights=cfg.head_weights or "shipped", rope_yarn=cfg.rope_yarn)
    names = [s.name for s in specs]

    log = EvidenceLog() if evidence else None

    def save(tasks, timings, complete=False):
        doc = rep.build(tasks, timings, names, dict(meta, complete=complete), seed)
        if output and leader():  # every rank of a tensor-parallel run holds the same gathered results
            common.write_json(output, doc)
        if log and leader():
            log.save(evidence)
        return doc

    tasks, timings = runner.run(rt, units, cfg, specs, seed=seed, open_session=ui.prefill,
                                on_task=_QuestionLog(ui), on_unit=save, keep=log and log.keep)
    return save(tasks, timings, complete=True)




def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--context-tokens must be integers separated by commas (e.g. 16384,30000), got {text!r}") \
            from None
    if not sizes:
        raise ValueError(f"--context-tokens needs at least one size (e.g. 16384,30000), got {text!r}")
    if min(sizes) < 256:
        raise ValueError(f"--context-tokens must be at least 256 each, got {text!r}")
    return list(dict.fromkeys(sizes))


def _config_meta(spec, base: AskConfig) -> dict:
    c = spec.apply(base)
    dense = "all" if c.attention == "dense" else ",".join(map(str, c.dense_layers)) or "none"
    return dict(name=spec.name, attention=c.attention, block_size=c.block_size, top_k=c.top_k,
                sink_blocks=c.sink_blocks, qa_policy=c.qa_policy, dense_layers=dense,
                overrides={k: list(v) if isinstance(v, tuple) else v for k, v in spec.overrides})


def _unit_meta(u: runner.Unit) -> dict:
    return dict(repo=u.repo, path=u.ws.source_root, context_tokens=u.context_tokens, files=len(u.ws.pack.files),
                pack_tokens=u.ws.pack.total_tokens, tasks=len(u.ws.tasks),
                kinds={k: sum(t.kind == k for t in u.ws.tasks) for k in KINDS})


def _load(cfg: AskConfig, ui):
    from agent import runtime
    from agent.catalog import ModelError

    try:
        with ui.status("loading model"):
            rt = runtime.load_runtime(cfg)
    except (ModelError, SettingError) as e:
        raise click.ClickException(str(e)) from None
    for note in rt.notes:
        ui.say(f"note: {note}")
    return rt


def _check_fit(rt, cfg: AskConfig, context_tokens: int) -> None:
    most = rt.max_positions - cfg.max_new_tokens - RESERVE
    if most < 256:  # the smallest --context-tokens
        raise click.UsageError(f"--max-new-tokens {cfg.max_new_tokens:,} leaves no room for a context in "
                               f"{rt.name}'s {rt.max_positions:,} positions; use at most "
                               f"{rt.max_positions - RESERVE - 256:,}")
    if context_tokens > most:
        raise click.UsageError(f"--context-tokens {context_tokens:,} does not fit {rt.name}'s {rt.max_positions:,} "
                               f"positions with the prompt and answer; use at most {most:,}")


def _units(paths, sizes, rt, ui, n_tasks, seed, include, exclude) -> list[runner.Unit]:
    """A workspace per repository per size, all built before the model answers anything, so that a
    repository without tasks stops the run at once."""
    labels = runner.labels(paths)
    make = partial(_workspace, rt=rt, ui=ui, seed=seed, include=include, exclude=exclude)
    return [u for size in sizes for u in _units_at(size, paths, labels, n_tasks, make, ui)]


def _units_at(size, paths, labels, n_tasks, make, ui) -> list[runner.Unit]:
    units, short = runner.units_at(size, paths, labels, n_tasks, make)
    if short > 0:
        ui.console.print(f"note: {n_tasks - short} of --tasks {n_tasks} at {size:,} tokens: the repositories have "
                         "no more candidates", highlight=False)
    return units


def _workspace(path, label, size, *, rt, ui, n_tasks, seed, include, exclude):
    try:
        with ui.status(f"building tasks for {label} at {size:,} tokens (packing, stripping docstrings in a temp copy)"):
            ws = build_workspace(path, rt.tokenizer, context_tokens=size, n_tasks=n_tasks, seed=seed,
                                 include=include or ("*.py",), exclude=exclude)
    except (TaskError, ingest.PackError) as e:
        raise click.ClickException(f"{path}: {e}") from None
    kinds = ", ".join(f"{sum(t.kind == k for t in ws.tasks)} {k}" for k in KINDS)
    ui.console.print(f"{label} at {size:,}: {len(ws.tasks)} tasks ({kinds}) over {len(ws.pack.files)} files, "
                     f"{ws.pack.total_tokens:,} tokens", highlight=False)
    return ws


class _QuestionLog:
    """on_task callback: plain progress lines on stderr (no TTY needed, agent.commands.progress.Ticker),
    at the first question of a config, then every PROGRESS_EVERY_S seconds with an ETA, and a line with
    the time taken at the end."""

    def __init__(self, ui):
        self.ui, self.ticker = ui, None

    def __call__(self, unit, name: str, done: int, total: int) -> None:
        if done == 0:
            self.ticker = Ticker(self._emit, f"{unit.repo} @ {unit.context_tokens:,}, {name}", "questions",
                                 every_s=PROGRESS_EVERY_S, first=True, final=True)
        self.ticker.update(done, total)

    def _emit(self, text: str) -> None:
        self.ui.console.print(text, highlight=False, markup=False)
