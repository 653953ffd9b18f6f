"""`moba-ask summarize`: one summary of large documents or a repository, in one pass (no map-reduce)."""

from __future__ import annotations

import json

import click

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
from agent.render import AnswerStream, answer_json, sources_block, stats_line, strength_lines


@click.command("summarize")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@common_options
@click.option("--focus", default="", help="What the summary should concentrate on.")
@click.option("--json", "as_json", is_flag=True, help="Print {answer, citations, files, stats} as JSON.")
@absolute_paths_option
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr (--json keeps them there).")
def summarize(paths, focus, as_json, absolute_paths, quiet, **kw):
    """Summarize the documents or code under PATH... in one pass over the whole text.

    The model is asked for an overview, then one short section per part, each ending with its
    source as path:start-end. A reference it writes is kept as a citation only when those lines
    are in the pack; a note says how many sections cite none (small models often skip them).
    The lines the attention was routed to while reading the focus and the summary's first 48
    tokens follow as routing citations, then every file by its routing strength.

    \b
    Examples:
      moba-ask summarize docs/
      moba-ask summarize report.pdf notes.md --focus "open risks"
      moba-ask summarize . --json > summary.json
    """
    check_paths(paths)
    check_utf8(focus, "--focus")
    cfg, opts = make_config(kw)
    from agent import app

    with cli_errors():
        session = app.open_session(paths, cfg, opts, "summarize", Progress(quiet), question=focus)
    if as_json:
        answer = session.ask(focus)
    else:
        with AnswerStream() as out:
            answer = session.ask(focus, on_token=out.write)
    answer = for_display(answer, session, absolute_paths)
    if not quiet:
        print_notes(answer.notes)
    if as_json:
        doc = answer_json(answer, session)
        click.echo(json.dumps({**doc, "files": {p: round(s, 4) for p, s in answer.strengths.items()}}, indent=1))
        return
    click.echo(sources_block(answer.citations), nl=False)
    if answer.strengths:
        click.echo("\nFiles by routing strength:\n" + "\n".join(strength_lines(answer.strengths)))
    if not quiet:
        click.echo(stats_line(answer.stats), err=True)

