"""Plumbing shared by ask, chat and summarize: the common flags (one-to-one with AskConfig), the
checks that run before any model loads, progress on stderr for `agent.app` (`Progress`), answers
shown with openable paths, and known errors turned into one-line messages (`cli_errors`).
"""

from __future__ import annotations

import contextlib
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
    ATTENTION,
    AskConfig,
    SettingError,
    parse_layers,
)
from agent.paths import tokens_dir
from moba.hf import QA_POLICIES


def rope_yarn_option(fn: Callable) -> Callable:
    """The --rope-yarn flag (AskConfig.rope_yarn), shared by ask, chat, summarize, eval and calibrate."""
    return click.option("--rope-yarn", type=float, default=AskConfig.rope_yarn, show_default=True, metavar="FACTOR",
                        help="YaRN rope scaling: the model reads FACTOR times the window it was trained on, e.g. "
                             "--rope-yarn 4 takes qwen2.5-coder-1.5b from 32,768 to 131,072 tokens (as Qwen's model "
                             "cards do). It changes the model, so answers differ at every length. 1 is off.")(fn)


def common_options(fn: Callable) -> Callable:
    """Decorate a command with the flags of AskConfig plus --include/--exclude."""
    opts = [
        click.option("-m", "--model", envvar="MOBA_ASK_MODEL",
                     help="Catalog name, hub id, local dir or .gguf. [default: $MOBA_ASK_MODEL, else "
                          "qwen2.5-7b-1m on CUDA, qwen2.5-coder-1.5b on CPU]"),
        click.option("--attention", type=click.Choice(ATTENTION), default=AskConfig.attention, show_default=True,
                     help="moba: sparse block attention; dense: exact attention (routing still scored); auto: "
                          "dense for contexts under 32,768 tokens on CPU and 65,536 on a GPU (or 8 x top-k x block "
                          "size, if larger), where it answered better and costs little, else moba."),
        click.option("--block-size", type=click.IntRange(min=1), default=AskConfig.block_size, show_default=True,
                     help="MoBA key block size."),
        click.option("--top-k", type=click.IntRange(min=1), default=AskConfig.top_k, show_default=True,
                     help="Blocks per query, own block included."),
        click.option("--sink-blocks", type=click.IntRange(min=0), default=AskConfig.sink_blocks,
                     show_default=True, help="Leading blocks every query attends."),
        click.option("--dense-layers", default=None, metavar="LIST",
                     help="Layers kept dense: '-1,-2', 'last3' or 'none'. [default: last3 on CPU, none on CUDA]"),
        click.option("--qa-policy", type=click.Choice(QA_POLICIES), default=AskConfig.qa_policy,
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
        click.option("--temperature", type=click.FloatRange(min=0), default=AskConfig.temperature, show_default=True,
                     help="0 is greedy."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=AskConfig.top_p,
                     show_default=True, help="Nucleus sampling when temperature > 0."),
        click.option("--no-cache", is_flag=True,
                     help="Neither read nor write the context cache or the token cache."),
        click.option("--device", help="cpu, cuda, cuda:1 ... [default: cuda when available]"),
        click.option("--chunk-size", type=click.IntRange(min=1), help="Prefill chunk (1024 CPU, 16384 CUDA)."),
        click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                     help="Full-precision weights in this dtype. [default: int8 weights on CPU (bf16 activations where the CPU "
                          "has bf16, else fp32), bfloat16 on CUDA]"),
        rope_yarn_option,
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
            rope_yarn=kw.pop("rope_yarn"),
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


def check_utf8(text: str, what: str) -> None:
    """UsageError when `text` (from argv or stdin) holds bytes that are not UTF-8: Python hands them over
    as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise click.UsageError(f"{what} is not valid UTF-8 (the terminal sent other bytes): retype it in a UTF-8 "
                               "terminal or set LANG to a UTF-8 locale") from None


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
    """`answer` with its citation and strength paths made openable from here: relative to the current
    directory (the pack keeps them relative to its root), or absolute."""
    from agent.citations import display_path, relocate

    root = session.pack.root
    strengths = {display_path(p, root, absolute): s for p, s in answer.strengths.items()}
    return dataclasses.replace(answer, citations=relocate(answer.citations, root, absolute), strengths=strengths)


@contextlib.contextmanager
def cli_errors():
    """Turn the application's user errors (`agent.app.USER_ERRORS`) into one-line ClickExceptions."""
    from agent.app import USER_ERRORS

    try:
        yield
    except USER_ERRORS as e:
        raise click.ClickException(str(e)) from None


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

    def say(self, line: str) -> None:
        """One line on stderr, printed as it is."""
        self._plain(line)

    def prefill(self, session) -> None:
        """Open `session` with its progress here (`agent.app.prefill`)."""
        from agent import app

        app.prefill(session, self)
