"""Terminal rendering of answers and citations: markdown on a TTY, plain text otherwise; the --json
document and the stats line of an answer.

Citations arrive as data (agent.citations.Citation); only this module and the CLI format them. Pack
notes (fallbacks, redacted secrets) and the files outlined or dropped to fit the budget are formatted
here for every command that packs.
"""

from __future__ import annotations

import os
import sys

SHOW = 10  # files listed per group on stderr; --json lists all


class AnswerStream:
    """Streams answer text to stdout: live-rendered markdown on a colour TTY, raw text otherwise."""

    def __init__(self, markdown: bool | None = None):
        tty = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.markdown = tty if markdown is None else markdown
        self.text = ""
        self.live = None

    def __enter__(self):
        if self.markdown:
            from rich.console import Console
            from rich.live import Live
            from rich.markdown import Markdown

            self._md = Markdown
            self.live = Live(Markdown(""), console=Console(), refresh_per_second=8, vertical_overflow="visible")
            self.live.__enter__()
        return self

    def write(self, piece: str) -> None:
        self.text += piece
        if self.live is not None:
            self.live.update(self._md(self.text))
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)
        elif self.text and not self.text.endswith("\n"):
            sys.stdout.write("\n")
        return False


def pack_notes(pk) -> list[str]:
    """Lines for stderr about a pack: each fallback note, then the secret values redacted in it."""
    lines = [f"note: {n}" for n in pk.notes]
    if pk.redacted:
        where = sorted({f"{path}:{line}" for path, line, _ in pk.redacted})
        more = f" (+{len(where) - 5} more)" if len(where) > 5 else ""
        lines.append(f"redacted {len(pk.redacted)} secret value(s) as [REDACTED:kind]: {', '.join(where[:5])}{more}")
    return lines


def budget_lines(pk) -> list[str]:
    """Lines for stderr listing the files packed as outlines and the files dropped to fit the budget:
    the first SHOW of each, then "... and N more (see --json)"."""
    outlined = [f"  {n:>9,} of {full:,}  {path}: {reason}" for path, n, full, reason in pk.outlined]
    dropped = [f"  {n:>9,}  {path}: {reason}" for path, n, reason in pk.dropped]
    return _listing("outlined (signatures only, over budget)", outlined) + _listing("dropped (over budget)", dropped)


def _listing(title: str, rows: list[str]) -> list[str]:
    if not rows:
        return []
    more = [f"  ... and {len(rows) - SHOW} more (see --json)"] if len(rows) > SHOW else []
    return [f"{title} {len(rows)}:", *rows[:SHOW], *more]


def citation_lines(cites) -> list[str]:
    """One line per citation: path:start-end  score  source."""
    out = []
    for c in cites:
        where = f"{c.path}:{c.start_line}" + (f"-{c.end_line}" if c.end_line != c.start_line else "")
        score = f"{c.score:5.1%}" if c.score else "    -"
        out.append(f"  {where:<48} {score}  {c.source}")
    return out


def sources_block(cites) -> str:
    """The "Sources" block printed after an answer (empty when there are no citations)."""
    if not cites:
        return ""
    return "\nSources (routing strength, origin):\n" + "\n".join(citation_lines(cites)) + "\n"


def strength_lines(strengths: dict[str, float], width: int = 24) -> list[str]:
    """Per-file routing strength as bars: `path  ████  12.3%`."""
    return [f"  {p:<48} {'█' * max(1, round(s * width)):<{width}} {s:6.1%}" for p, s in strengths.items()]


def answer_json(answer, session) -> dict:
    """The --json document: answer, citations and stats. stats.notes: where the run differed from
    what was asked (the lines stated on stderr); stats.citation_weights: "calibrated" or "uniform";
    stats.stopped: why the answer ended ("end", "length", "repetition", "interrupted"), stats.answer_limit
    the most tokens it could take."""
    p = session.params
    notes = [*session.runtime.notes, *session.notes, *answer.notes]
    stats = dict(context_tokens=session.context_len, prefill_s=answer.stats["prefill_s"],
                 decode_tok_s=answer.stats["decode_tok_s"], cache_hit=answer.stats["cache_hit"],
                 model=session.runtime.name, attention=session.config.attention, block_size=p.block_size, top_k=p.top_k,
                 notes=notes, citation_weights=session.stats.get("citation_weights"),
                 stopped=answer.stats["stopped"], answer_limit=answer.stats["answer_limit"])
    return {"answer": answer.text, "citations": [x.to_dict() for x in answer.citations], "stats": stats}


def stats_line(stats: dict) -> str:
    how = "cache hit" if stats["cache_hit"] else f"prefill {stats['prefill_s']:.1f}s"
    return f"[{stats['context_tokens']:,} tokens, {how}, {stats['decode_tok_s']:.1f} tok/s decode]"
