"""The application: from paths, an AskConfig and pack options to an open Session, through loading the
model, packing to fit its window, settling the config for the packed context, checking that the
question, answer and KV cache fit, and prefilling (or hitting the context cache).

ask, chat and summarize call `open_session`, then `Session.ask`: the Answer carries its citations,
per-file strengths and routing counts, so a command only renders. Progress and notes go to a
`Reporter`; bad input raises one of USER_ERRORS, each a one-line message naming the fix. Knows
nothing of click or terminals.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Protocol

import ingest
from agent import parallel, runtime
from agent.catalog import ModelError
from agent.config import (
    AUTO_DENSE_FACTOR,
    MIN_ANSWER_ROOM,
    RESERVE,
    AskConfig,
    SettingError,
    answer_room,
    auto_floor,
    auto_threshold,
    settle,
)
from agent.ctxcache import ContextCache
from agent.engine import MemoryBudgetError, check_memory
from agent.render import budget_lines, pack_notes
from agent.session import Runtime, Session
from ingest.records import BudgetError
from moba.hf import MobaParams

USER_ERRORS = (ModelError, SettingError, MemoryBudgetError, ingest.PackError)


class Reporter(Protocol):
    """Where progress and notes go (agent.commands.common.Progress renders them on stderr)."""

    def status(self, text: str) -> contextlib.AbstractContextManager:
        """A step of unknown length, announced while it runs."""

    def track(self, label: str, unit: str) -> contextlib.AbstractContextManager[Callable[[int, int], None]]:
        """A step that reports update(done, total) as it goes."""

    def say(self, line: str) -> None:
        """One line of information, or a note (`note: ...`)."""


def open_session(paths, config: AskConfig, options: ingest.PackOptions, mode: str, ui: Reporter,
                 question: str = "") -> Session:
    """Load the model, pack `paths` to fit its window, settle `config` for the packed context, check
    the window and memory, and prefill (or hit the context cache); return the open Session.

    question: the first question (or summary focus), checked against the room the session leaves for
    it before anything is prefilled. Raises one of USER_ERRORS.
    """
    with ui.status("loading model"):
        rt = runtime.load_runtime(config)
    for note in rt.notes:
        ui.say(f"note: {note}")
    budget = context_budget(rt, config)
    with ui.track("packing", "files") as update:
        pk = _pack(paths, rt, dataclasses.replace(options, max_tokens=budget), config.max_tokens == 0, update)
    settled = settle(config, pk.total_tokens, rt.device)
    session = Session(rt, pk, settled, mode, None if settled.no_cache or parallel.world() else _context_cache())
    session.notes = check_fit(session, question)
    for line in [*(f"note: {n}" for n in session.notes), *pack_lines(pk, budget)]:
        ui.say(line)
    ui.say(f"attention: {describe(settled.attention, session.params)}{_why(config, settled, pk.total_tokens, rt.device)}")
    prefill(session, ui)
    return session


def prefill(session: Session, ui: Reporter) -> None:
    """Open `session` (prefill or context cache hit), stating the KV cache's memory first and refusing
    (MemoryBudgetError) one that does not fit the device."""

    def on_engine(engine) -> None:
        check_memory(engine)
        ui.say(kv_line(engine))

    with ui.track("prefill", "tokens") as update:
        session.open(progress=update, on_engine=on_engine)
    s = session.stats
    how = "context cache hit" if s["cache_hit"] else f"prefilled in {s['prefill_s']:.1f}s"
    ui.say(f"{session.context_len:,} context tokens: {how}")


def _pack(paths, rt: Runtime, options: ingest.PackOptions, from_window: bool, progress) -> ingest.Pack:
    """ingest.pack; when the budget came from the model's window (no --max-tokens) and nothing fits it,
    the error names the window, not a flag the user never gave."""
    try:
        return ingest.pack(list(paths), rt.tokenizer, options, progress=progress)
    except BudgetError:
        if not from_window:
            raise
        raise SettingError(
            f"{rt.name}'s window of {rt.max_positions:,} positions leaves {options.max_tokens:,} tokens for files "
            f"beside the question and answer, too few for any file here: use a model with a longer window") from None


def context_budget(rt: Runtime, config: AskConfig) -> int:
    """The pack's token budget: --max-tokens, else the window less RESERVE (prompt frame and question)
    and `answer_room`; never --max-new-tokens, so the pack and its context cache entry stay the same
    whatever the answer length. Raises SettingError, before anything is packed, for a --max-tokens
    that would leave the question and answer no room in the model's window."""
    most = max(256, rt.max_positions - RESERVE - answer_room(rt.max_positions))
    if config.max_tokens > most:
        raise SettingError(
            f"--max-tokens {config.max_tokens:,} does not fit {rt.name}'s window of {rt.max_positions:,} positions "
            f"with {RESERVE:,} tokens for the question and {answer_room(rt.max_positions):,} for the answer: use "
            f"--max-tokens {most:,} or less (0 picks that), or a model with a longer window")
    return config.max_tokens or most


def check_fit(session: Session, question: str = "") -> list[str]:
    """Raise SettingError, before prefill, when the context and question leave the answer no room in
    the model's window. Return a note when the answer asked for is longer than that room: the answer
    will stop there."""
    rt, cfg = session.runtime, session.config
    asked = session.turn_length(question)
    room = min(rt.max_positions, session.capacity()) - session.context_len - asked
    prompt_only = session.context_len - session.pack.total_tokens + asked  # template and question, no files
    if rt.max_positions - prompt_only < MIN_ANSWER_ROOM:
        raise SettingError(
            f"{rt.name}'s window of {rt.max_positions:,} positions cannot hold the prompt and question ({prompt_only:,} "
            f"tokens) and a {MIN_ANSWER_ROOM}-token answer even with no file: no --max-tokens fits; use a model "
            "with a longer window or a shorter question")
    if room < MIN_ANSWER_ROOM:
        raise SettingError(
            f"the question takes {asked:,} tokens with its prompt; {max(0, asked + room - MIN_ANSWER_ROOM):,} fit "
            f"beside the context ({session.context_len:,} tokens) and a {MIN_ANSWER_ROOM}-token answer in "
            f"{rt.name}'s window of {rt.max_positions:,} positions: shorten it (put long text in a file under PATH "
            "instead) or lower --max-tokens")
    if cfg.max_new_tokens and cfg.max_new_tokens > room:
        return [f"--max-new-tokens {cfg.max_new_tokens:,} is more than the {room:,} tokens {rt.name}'s window "
                f"of {rt.max_positions:,} leaves after the context and question: the answer stops there "
                "(lower --max-tokens for more)"]
    return []


def pack_lines(pk, budget: int) -> list[str]:
    """What packing did: files and tokens against the budget, the outlined and dropped files (the first
    of each, `agent.render.budget_lines`), its notes."""
    lines = [f"packed {len(pk.files)} files, {pk.total_tokens:,} tokens (budget {budget:,}); "
             f"{len(pk.skipped)} skipped, {len(pk.outlined)} outlined and {len(pk.dropped)} dropped to fit"]
    return lines + budget_lines(pk) + pack_notes(pk)


def describe(attention: str, p: MobaParams) -> str:
    """The attention a run uses, in one phrase."""
    if attention == "dense":
        return "dense"
    layers = ",".join(map(str, p.dense_layers)) or "none"
    return f"moba, block {p.block_size}, top-k {p.top_k}, {p.sink_blocks} sink block(s), dense layers {layers}"


def kv_line(engine) -> str:
    """The KV cache's memory and where it comes from."""
    c, n = engine.config, engine.cache.capacity
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (f"KV cache: {engine.kv_bytes() / 2**20:,.0f} MiB = 2 x {c.num_hidden_layers} layers x "
            f"{engine.kv_heads} KV heads x {head_dim} x {n:,} tokens x {engine.dtype.itemsize} B")


def _why(given: AskConfig, settled: AskConfig, tokens: int, device: str) -> str:
    if given.attention != "auto":
        return ""
    side = "<" if settled.attention == "dense" else ">="
    threshold = auto_threshold(given, device)
    rule = f"{AUTO_DENSE_FACTOR} x top-k {given.top_k} x block {given.block_size}"
    if threshold == auto_floor(device):
        where = "GPU" if device.startswith("cuda") else "CPU"
        rule = f"the {where} floor under which exact attention answered better and costs little"
    return f" (auto: {tokens:,} tokens {side} {threshold:,} = {rule}; --attention moba|dense to choose)"


def _context_cache() -> ContextCache:
    try:
        return ContextCache()
    except ValueError as e:  # a bad MOBA_ASK_CACHE_MAX_GB
        raise SettingError(str(e).splitlines()[0]) from None
