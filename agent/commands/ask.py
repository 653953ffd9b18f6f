"""`moba-ask ask` (the default command): one question about PATH..., answered with citations."""

from __future__ import annotations

import importlib.util
import json
import os

import click

from agent.commands.common import (
    Progress,
    absolute_paths_option,
    check_paths,
    check_utf8,
    check_writable,
    cli_errors,
    common_options,
    for_display,
    make_config,
    print_notes,
)
from agent.render import AnswerStream, answer_json, sources_block, stats_line


@click.command("ask")
@click.argument("args", nargs=-1, required=True, metavar="PATH... QUESTION")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print {answer, citations, stats} as JSON.")
@click.option("--routing-map", type=click.Path(dir_okay=False, writable=True),
              help="Write a heat map of the routing (.html or .png).")
@absolute_paths_option
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr (--json keeps them there).")
def ask(args, as_json, routing_map, absolute_paths, quiet, **kw):
    """Answer QUESTION about the files under PATH... (ask is the default command).

    The whole repository is packed into one context and prefilled once (cached on disk for the
    next question). The answer streams to stdout, then the citations: the lines the attention
    was routed to, and the path:line references the model wrote, with paths relative to the
    current directory (--absolute-paths: absolute).

    \b
    Examples:
      moba-ask . "Where is the config file parsed?"
      moba-ask src/ docs/ "How does retry work?" --model smollm2-135m
      moba-ask . "What does pack() return?" --json | jq .citations
      moba-ask . "Which module talks to the database?" --routing-map routing.html
    """
    if len(args) < 2:
        raise click.UsageError('give PATH... and then a QUESTION, e.g. moba-ask . "where is X parsed?"')
    *paths, question = args
    if not question.strip():
        raise click.UsageError('the question is empty: moba-ask PATH "your question"')
    check_utf8(question, "the question")
    check_paths(paths)
    if routing_map:
        check_routing_map(routing_map)
    cfg, opts = make_config(kw)
    from agent import app

    with cli_errors():
        session = app.open_session(paths, cfg, opts, "ask", Progress(quiet), question=question)
    if as_json:
        answer = for_display(session.ask(question), session, absolute_paths)
    else:
        with AnswerStream() as out:
            answer = for_display(session.ask(question, on_token=out.write), session, absolute_paths)
        click.echo(sources_block(answer.citations), nl=False)
    if not quiet:
        print_notes(answer.notes)
    if routing_map:
        write_map(routing_map, question, answer, session, absolute_paths)
    if as_json:
        click.echo(json.dumps(answer_json(answer, session), indent=1))
    elif not quiet:
        click.echo(stats_line(answer.stats), err=True)


def write_map(path: str, question: str, answer, session, absolute: bool) -> None:
    """The --routing-map page of `answer`, titled by the question and the run, paths as the citations show them."""
    from agent.citations import display_path
    from agent.parallel import leader
    from agent.routingmap import relocated, write_routing_map

    p = session.params
    about = f"model {session.runtime.name}, {session.config.attention} attention, block {p.block_size}, top-k {p.top_k}"
    routing = relocated(answer.routing, lambda x: display_path(x, session.pack.root, absolute))
    try:
        if leader():  # every rank of a tensor-parallel run holds the same gathered routing; rank 0 writes it
            write_routing_map(path, routing, question=question, about=about, citations=answer.citations)
    except OSError as e:
        raise click.ClickException(f"cannot write the routing map {path}: {e.strerror or e}") from None


def check_routing_map(path: str) -> None:
    """Fail before any model loads when the routing map could not be written after the answer."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".html", ".png"):
        raise click.ClickException(f"--routing-map must end in .html or .png, got {path}")
    if suffix == ".png" and importlib.util.find_spec("matplotlib") is None:
        raise click.ClickException("a PNG routing map needs matplotlib: pip install matplotlib, or use .html")
    check_writable(path, "--routing-map")
