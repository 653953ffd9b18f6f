"""`moba-ask chat`: a terminal chat over one prefilled context (each turn reuses the KV cache)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

import click

from agent.citations import display_path
from agent.commands.common import (
    Progress,
    absolute_paths_option,
    check_paths,
    check_utf8,
    cli_errors,
    common_options,
    for_display,
    make_config,
    print_notes,
)
from agent.render import AnswerStream, citation_lines, sources_block, strength_lines

HELP = """commands:
  /help       this help
  /files      the packed files and their tokens
  /tokens     context, history and free tokens
  /citations  the last answer's citations and routing strength per file
  /reset      forget the conversation (the context stays prefilled)
  /exit       leave (also Ctrl-D)
Ctrl-C stops the current answer, not the chat."""


@click.command("chat")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@common_options
@absolute_paths_option
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
def chat(paths, absolute_paths, quiet, **kw):
    """Chat about the files under PATH...: the context is prefilled once, every turn reuses it.

    \b
    Examples:
      moba-ask chat .
      moba-ask chat src/ --model smollm2-135m --max-new-tokens 200
    Type /help inside the chat for its commands.
    """
    check_paths(paths)
    cfg, opts = make_config(kw)
    from agent import app

    with cli_errors():
        session = app.open_session(paths, cfg, opts, "chat", Progress(quiet))
    _readline_history()
    click.echo("Ask about the files; /help for commands, /exit to leave.", err=True)
    last = None
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        if not line:
            continue
        try:
            check_utf8(line, "the question")
        except click.UsageError as e:
            click.echo(f"Error: {e.message}", err=True)
            continue
        if line.startswith("/"):
            if _command(line, session, last, absolute_paths) == "exit":
                return
            continue
        last = _answer(session, line, quiet, absolute_paths) or last


def _answer(session, question: str, quiet: bool, absolute: bool):
    from agent.kvcache import CacheFullError

    try:
        with _StopOnCtrlC() as stop, AnswerStream() as out:
            answer = session.ask(question, on_token=out.write, should_stop=stop.is_set)
    except CacheFullError:
        free = session.capacity() - session.context_len
        click.echo(f"this turn does not fit the {free:,} tokens kept for the conversation: /reset to start "
                   "over, or ask something shorter", err=True)
        return None
    answer = for_display(answer, session, absolute)
    if answer.interrupted:
        click.echo("[stopped]", err=True)
    if not quiet:
        print_notes(answer.notes)
    click.echo(sources_block(answer.citations), nl=False)
    return answer


def _command(line: str, session, last, absolute: bool) -> str | None:
    cmd = line.split()[0].lower()
    if cmd in ("/exit", "/quit"):
        return "exit"
    if cmd == "/help":
        click.echo(HELP)
    elif cmd == "/files":
        outlined = {o[0] for o in session.pack.outlined}
        for f in session.pack.files:
            path = display_path(f.path, session.pack.root, absolute)
            mark = "  (outline: signatures only)" if f.path in outlined else ""
            click.echo(f"  {path:<60} {f.tokens:>8,} tokens  {f.lines:>6,} lines{mark}")
    elif cmd == "/tokens":
        used = session.engine.length
        click.echo(f"  context {session.context_len:,}  history {used - session.context_len:,}  "
                   f"free {session.capacity() - used:,} of {session.capacity():,}")
    elif cmd == "/citations":
        _show_citations(last)
    elif cmd == "/reset":
        session.reset()
        click.echo("  conversation cleared; the context stays prefilled")
    else:
        click.echo(f"unknown command {cmd}; /help lists the commands", err=True)
    return None


def _show_citations(last) -> None:
    if last is None:
        click.echo("  no answer yet")
        return
    click.echo("\n".join(citation_lines(last.citations)) or "  no citations")
    click.echo("routing strength per file:")
    click.echo("\n".join(strength_lines(last.strengths)) or "  none")


class _StopOnCtrlC:
    """While active, Ctrl-C sets a flag (checked between tokens) instead of raising."""

    def __enter__(self):
        self.flag = threading.Event()
        self.is_set = self.flag.is_set
        self.old = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, lambda *_: self.flag.set())
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        return False


def _readline_history() -> None:
    with contextlib.suppress(ImportError, OSError):
        import atexit
        import readline

        from agent import paths

        path = str(paths.chat_history())
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            readline.read_history_file(path)
        atexit.register(readline.write_history_file, path)
