"""`moba-ask summarize`: one summary of large documents or a repository, in one pass (no map-reduce)."""

from __future__ import annotations

import json

import click

from agent import citations
from agent.commands.ask import answer_json, stats_line
from agent.commands.common import check_paths, common_options, make_config, open_session, print_notes
from agent.render import AnswerStream, sources_block, strength_lines


@click.command("summarize")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@common_options
@click.option("--focus", default="", help="What the summary should concentrate on.")
@click.option("--json", "as_json", is_flag=True, help="Print {answer, citations, stats} as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or notes on stderr.")
def summarize(paths, focus, as_json, quiet, **kw):
    """Summarize the documents or code under PATH... in one pass over the whole text.

    Every section of the summary cites its source; the files the attention was routed to are
    listed with their routing strength.

    \b
    Examples:
      moba-ask summarize docs/
      moba-ask summarize report.pdf notes.md --focus "open risks"
      moba-ask summarize . --json > summary.json
    """
    check_paths(paths)
    cfg, opts = make_config(kw)
    session = open_session(paths, cfg, opts, "summarize", quiet, question=focus)
    if as_json:
        answer = session.ask(focus)
        click.echo(json.dumps(answer_json(answer, session), indent=1))
        return
    with AnswerStream() as out:
        answer = session.ask(focus, on_token=out.write)
    click.echo(sources_block(answer.citations), nl=False)
    c = session.config
    strengths = citations.file_strengths(answer.recorder, session.smap, block_size=c.block_size,
                                         sink_blocks=c.sink_blocks)
    if strengths:
        click.echo("\nFiles by routing strength:\n" + "\n".join(strength_lines(strengths)))
    if not quiet:
        print_notes(answer.notes)
        click.echo(stats_line(answer.stats), err=True)
