"""Plumbing shared by ask, chat and summarize: the common flags (one-to-one with AskConfig),
opening a session with progress on stderr, and turning known errors into one-line messages.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import click

import ingest
from agent.commands.progress import announce, track
from agent.config import (
    AUTO_DENSE_FACTOR,
    MIN_ANSWER_ROOM,
    AskConfig,
    SettingError,
    answer_room,
    auto_threshold,
    parse_layers,
    settle,
)
from agent.paths import tokens_dir
from agent.render import pack_notes

RESERVE = 512  # tokens kept free beside the pack for the prompt frame and the question


def common_options(fn: Callable) -> Callable:
    """Decorate a command with the flags of AskConfig plus --include/--exclude."""
    opts = [
        click.option("-m", "--model", envvar="MOBA_ASK_MODEL",
                     help="Catalog name, hub id, local dir or .gguf. [default: $MOBA_ASK_MODEL, else "
                          "qwen2.5-7b-1m on CUDA, qwen2.5-coder-1.5b on CPU]"),
        click.option("--attention", type=click.Choice(["auto", "moba", "dense"]), default="auto", show_default=True,
                     help="moba: sparse block attention; dense: exact attention (routing still scored); auto: "
                          "dense for contexts under 8 x top-k x block size tokens, else moba."),
        click.option("--block-size", type=click.IntRange(min=1), default=AskConfig.block_size, show_default=True,
                     help="MoBA key block size."),
        click.option("--top-k", type=click.IntRange(min=1), default=AskConfig.top_k, show_default=True,
                     help="Blocks per query, own block included."),
        click.option("--sink-blocks", type=click.IntRange(min=0), default=AskConfig.sink_blocks,
                     show_default=True, help="Leading blocks every query attends."),
        click.option("--dense-layers", default=None, metavar="LIST",
                     help="Layers kept dense: '-1,-2', 'last3' or 'none'. [default: last3 on CPU, none on CUDA]"),
        click.option("--qa-policy", type=click.Choice(["moba", "dense"]), default=AskConfig.qa_policy,
                     help="Attention for the question and answer tokens: dense (exact; a question is a few "
                          "hundred tokens) or moba. [default: dense, which answered 0.70 against 0.52 for moba on "
                          "the held-out evaluation; bench/RESULTS.md]"),
        click.option("--local-blocks", type=click.IntRange(min=0), default=AskConfig.local_blocks,
                     show_default=True, help="Blocks just before a query's own block that it always attends "
                                             "(they take routed slots, so fewer than --top-k)."),
        click.option("--gate-subblocks", type=click.IntRange(min=1), default=AskConfig.gate_subblocks,
                     show_default=True, help="The gate scores a block by the best of this many equal parts."),
        click.option("--head-weights", metavar="FILE|uniform",
                     help="Citation head weights: a file from `moba-ask calibrate`, or 'uniform' for every head "
                          "alike. [default: the model's shipped weights, else uniform with a note]"),
        click.option("--max-tokens", type=click.IntRange(min=0), default=0,
                     help="Context budget in tokens; files are dropped by priority to fit. 0: the model's "
                          "window less a fixed room for the question (512) and the answer (1024, a quarter of "
                          "a smaller window), whatever --max-new-tokens says. [default: 0]"),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
                     help="Longest answer; an answer longer than the window leaves stops there, with a note. "
                          "[default: 256 for what/where questions, 512 for how/why/explain, 1024 for summaries]"),
        click.option("--repetition-penalty", type=click.FloatRange(min=1), default=AskConfig.repetition_penalty,
                     show_default=True, help="Divide the logits of the answer's last 64 tokens by this (1: off)."),
        click.option("--repeat-stop", type=click.IntRange(min=0), default=AskConfig.repeat_stop, show_default=True,
                     help="Stop the answer when it ends in this many copies of one phrase (0: never)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 is greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=AskConfig.top_p,
                     show_default=True, help="Nucleus sampling when temperature > 0."),
        click.option("--no-cache", is_flag=True,
                     help="Neither read nor write the context cache or the token cache."),
        click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available]"),
        click.option("--chunk-size", type=click.IntRange(min=1), help="Prefill chunk (1024 CPU, 16384 CUDA)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="[default: float32 on CPU, bfloat16 on CUDA]"),
        click.option("--include", multiple=True, metavar="GLOB", help="Only pack files matching GLOB."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Leave out files matching GLOB."),
        click.option("--no-drop", is_flag=True, help="Fail instead of dropping files over the budget."),
    ]
    return functools.reduce(lambda f, opt: opt(f), reversed(opts), fn)


def make_config(kw: dict) -> tuple[AskConfig, ingest.PackOptions]:
    """Split the common flags into an AskConfig and PackOptions (pops them from kw)."""
    try:
        cfg = AskConfig(
            model=kw.pop("model"), attention=kw.pop("attention"), block_size=kw.pop("block_size"),
            top_k=kw.pop("top_k"), sink_blocks=kw.pop("sink_blocks"),
            dense_layers=parse_layers(kw.pop("dense_layers")), qa_policy=kw.pop("qa_policy"),
            local_blocks=kw.pop("local_blocks"), gate_subblocks=kw.pop("gate_subblocks"),
            head_weights=check_head_weights(kw.pop("head_weights")),
            max_tokens=kw.pop("max_tokens"), max_new_tokens=kw.pop("max_new_tokens"),
            temperature=kw.pop("temperature"), top_p=kw.pop("top_p"), no_cache=kw.pop("no_cache"),
            repetition_penalty=kw.pop("repetition_penalty"), repeat_stop=kw.pop("repeat_stop"),
            device=kw.pop("device"), chunk_size=kw.pop("chunk_size"), dtype=kw.pop("dtype"),
        )
        opts = ingest.PackOptions(include=kw.pop("include"), exclude=kw.pop("exclude"), drop=not kw.pop("no_drop"),
                                  token_cache=None if cfg.no_cache else tokens_dir())
    except (SettingError, ingest.PackError) as e:
        raise click.UsageError(str(e)) from None
    return cfg, opts


def check_head_weights(spec: str | None) -> str | None:
    """Fail before any model loads on a --head-weights file that cannot be read; return spec."""
    from agent import headweights

    if spec not in (None, headweights.UNIFORM):
        try:
            headweights.read(Path(spec))
        except headweights.WeightsError as e:
            raise SettingError(f"--head-weights: {e}") from None
    return spec


def check_paths(paths) -> None:
    """Fail early, before any model loads, on a path that does not exist."""
    if not paths:
        raise click.UsageError("give at least one PATH (a directory or files) to read")
    for p in paths:
        if not os.path.exists(p):
            raise click.ClickException(f"path not found: {p} (check the spelling, or cd to the repository)")


def absolute_paths_option(fn: Callable) -> Callable:
    """The --absolute-paths flag of the commands that print citations."""
    return click.option("--absolute-paths", is_flag=True,
                        help="Print cited paths absolute. [default: relative to the current directory]")(fn)


def for_display(answer, session, absolute: bool):
    """`answer` with its citation paths made openable from here: relative to the current directory (the
    pack keeps them relative to its root), or absolute."""
    from agent.citations import relocate

    return dataclasses.replace(answer, citations=relocate(answer.citations, session.pack.root, absolute))


def file_strengths(answer, session, absolute: bool) -> dict[str, float]:
    """Routing strength per file for `answer`, keyed by paths shown as `for_display` shows them."""
    from agent.citations import display_path
    from agent.citations import file_strengths as strengths

    c = session.config
    got = strengths(answer.recorder, session.smap, block_size=c.block_size, sink_blocks=c.sink_blocks)
    return {display_path(p, session.pack.root, absolute): s for p, s in got.items()}


def print_notes(notes) -> None:
    """Each note as one `note: ...` line on stderr."""
    for note in notes:
        click.echo(f"note: {note}", err=True)


def write_json(path: str, doc: dict, flag: str = "-o") -> None:
    """Write the document whole or not at all (a run killed mid-write keeps the previous file)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise click.ClickException(f"cannot write {flag} {path}: {e.strerror}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path: str, flag: str) -> None:
    """Fail before any model loads when `path` (an output file) could not be written after the run."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.ClickException(f"{flag} {path}: the directory {folder} does not exist; create it first")
    try:  # a real write: permission bits say nothing to root, nor about /proc or a read-only mount
        if os.path.exists(path):
            open(path, "ab").close()
        else:
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise click.ClickException(f"{flag} {path}: cannot write there ({e.strerror or e}); pick another path") from None


def open_session(paths, cfg: AskConfig, opts: ingest.PackOptions, mode: str, quiet: bool = False,
                 question: str = ""):
    """Load the model, pack the paths to fit, check the window and memory, prefill (or hit the context
    cache); return the Session. `question`: the first question (or summary focus), checked against the
    room the session leaves for it before anything is prefilled."""
    from agent import parallel, runtime
    from agent.catalog import ModelError
    from agent.engine import MemoryBudgetError
    from agent.session import Session

    ui = Progress(quiet)
    try:
        with ui.status("loading model"):
            rt = runtime.load_runtime(cfg)
        for note in rt.notes:
            ui.console.print(f"note: {note}", highlight=False)
        budget = context_budget(rt, cfg)
        options = ingest.PackOptions(**{**opts.__dict__, "max_tokens": budget})
        pk = ui.pack(paths, rt.tokenizer, options)
        given, cfg = cfg, _settle_runtime(rt, cfg, pk.total_tokens)
        session = Session(rt, pk, cfg, mode, None if cfg.no_cache or parallel.world() else _context_cache())
        session.notes = check_fit(session, question)
        for note in session.notes:
            ui.console.print(f"note: {note}", highlight=False, markup=False)
        ui.report_pack(pk, budget, session)
        ui.console.print(f"attention: {_describe(cfg)}{_why(given, cfg, pk.total_tokens)}", highlight=False)
        ui.prefill(session)
    except (ModelError, SettingError, MemoryBudgetError, ingest.PackError) as e:
        raise click.ClickException(str(e)) from None
    return session


def _context_cache():
    from agent.ctxcache import ContextCache

    try:
        return ContextCache()
    except ValueError as e:  # a bad MOBA_ASK_CACHE_MAX_GB
        raise click.ClickException(str(e).splitlines()[0]) from None


def context_budget(rt, cfg: AskConfig) -> int:
    """The pack's token budget: --max-tokens, else the window less RESERVE (prompt frame and question)
    and `answer_room`; never --max-new-tokens, so the pack and its context cache entry stay the same
    whatever the answer length. Raises ClickException, before anything is packed, for a --max-tokens
    that would leave the question and answer no room in the model's window."""
    most = max(256, rt.max_positions - RESERVE - answer_room(rt.max_positions))
    if cfg.max_tokens > most:
        raise click.ClickException(
            f"--max-tokens {cfg.max_tokens:,} does not fit {rt.name}'s window of {rt.max_positions:,} positions "
            f"with {RESERVE:,} tokens for the question and {answer_room(rt.max_positions):,} for the answer: use "
            f"--max-tokens {most:,} or less (0 picks that), or a model with a longer window")
    return cfg.max_tokens or most


def check_fit(session, question: str = "") -> list[str]:
    """Fail before prefill when the context and question leave the answer no room in the model's window
    (ClickException naming the flag). Return a note when the answer asked for is longer than that room:
    the answer will stop there."""
    rt, cfg = session.runtime, session.config
    asked = session.turn_length(question)
    room = min(rt.max_positions, session.capacity()) - session.context_len - asked
    prompt_only = session.context_len - session.pack.total_tokens + asked  # template and question, no files
    if rt.max_positions - prompt_only < MIN_ANSWER_ROOM:
        raise click.ClickException(
            f"{rt.name}'s window of {rt.max_positions:,} positions cannot hold the prompt and question ({prompt_only:,} "
            f"tokens) and a {MIN_ANSWER_ROOM}-token answer even with no file: no --max-tokens fits; use a model "
            "with a longer window or a shorter question")
    if room < MIN_ANSWER_ROOM:
        raise click.ClickException(
            f"the question takes {asked:,} tokens with its prompt; {max(0, asked + room - MIN_ANSWER_ROOM):,} fit "
            f"beside the context ({session.context_len:,} tokens) and a {MIN_ANSWER_ROOM}-token answer in "
            f"{rt.name}'s window of {rt.max_positions:,} positions: shorten it (put long text in a file under PATH "
            "instead) or lower --max-tokens")
    if cfg.max_new_tokens and cfg.max_new_tokens > room:
        return [f"--max-new-tokens {cfg.max_new_tokens:,} is more than the {room:,} tokens {rt.name}'s window "
                f"of {rt.max_positions:,} leaves after the context and question: the answer stops there "
                "(lower --max-tokens for more)"]
    return []


def _settle_runtime(rt, cfg: AskConfig, tokens: int) -> AskConfig:
    """cfg's defaults made concrete for a context of `tokens` on the runtime's device; the loaded
    model is re-tuned to it."""
    resolved = settle(cfg, tokens, rt.device)
    if resolved != cfg and rt.retune:
        rt.retune(resolved)
    return resolved


def _describe(c: AskConfig) -> str:
    if c.attention == "dense":
        return "dense"
    layers = ",".join(map(str, c.dense_layers)) or "none"
    return f"moba, block {c.block_size}, top-k {c.top_k}, {c.sink_blocks} sink block(s), dense layers {layers}"


def _why(cfg: AskConfig, resolved: AskConfig, tokens: int) -> str:
    if cfg.attention != "auto":
        return ""
    side = "<" if resolved.attention == "dense" else ">="
    return (f" (auto: {tokens:,} tokens {side} {auto_threshold(cfg):,} = {AUTO_DENSE_FACTOR} x top-k {cfg.top_k} x "
            f"block {cfg.block_size}; --attention moba|dense to choose)")


class Progress:
    """Progress and notes on stderr (agent.commands.progress: a bar on a terminal, plain lines elsewhere);
    silent when quiet. NO_COLOR is honoured by rich."""

    def __init__(self, quiet: bool):
        from rich.console import Console

        self.quiet = quiet
        self.console = Console(stderr=True, quiet=quiet, soft_wrap=True)

    def status(self, text: str):
        """A spinner on a terminal; elsewhere the text as a plain line once the step runs a few seconds."""
        if self.quiet or sys.stderr.isatty():
            return self.console.status(text)
        return announce(self._plain, text)

    def _plain(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)

    def track(self, label: str, unit: str):
        """A context manager giving update(done, total) for one long step."""
        return track(self.console, label, unit, self.quiet)

    def pack(self, paths, tokenizer, options):
        with self.track("packing", "files") as update:
            return ingest.pack(list(paths), tokenizer, options, progress=update)

    def report_pack(self, pk, budget: int, session) -> None:
        self.console.print(f"packed {len(pk.files)} files, {pk.total_tokens:,} tokens (budget {budget:,}); "
                           f"{len(pk.skipped)} skipped, {len(pk.dropped)} dropped to fit", highlight=False)
        for path, tokens, reason in pk.dropped[:5]:
            self.console.print(f"  dropped {path} ({tokens:,} tokens): {reason}", highlight=False, markup=False)
        for line in pack_notes(pk):
            self.console.print(line, highlight=False, markup=False)

    def prefill(self, session) -> None:
        with self.track("prefill", "tokens") as update:
            session.open(progress=update, on_engine=self.kv_note)
        s = session.stats
        how = "context cache hit" if s["cache_hit"] else f"prefilled in {s['prefill_s']:.1f}s"
        self.console.print(f"{session.context_len:,} context tokens: {how}", highlight=False)

    def kv_note(self, engine) -> None:
        """State the KV cache's memory before prefill starts; raise MemoryBudgetError when it does not fit."""
        from agent.engine import check_memory

        check_memory(engine)
        c, n = engine.config, engine.cache.capacity
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.console.print(f"KV cache: {engine.kv_bytes() / 2**20:,.0f} MiB = 2 x {c.num_hidden_layers} layers x "
                           f"{c.num_key_value_heads} KV heads x {head_dim} x {n:,} tokens x "
                           f"{engine.dtype.itemsize} B", highlight=False)
