"""Scorers for one answer: name match, sentence BLEU and the RepoQA pass rule, citation ranks,
line precision/recall and bogus citations.

BLEU follows RepoQA (nltk `sentence_bleu` on whitespace tokens, 4-gram uniform weights, Chen and
Cherry smoothing "method4" with k=5, brevity penalty against the reference); it is written here, not
imported. Citations are anything with path/start_line/end_line (agent.citations.Citation). Knows no
model and no files on disk.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from textwrap import dedent

BLEU_PASS = 0.8
_FENCE = re.compile(r"```[^\n]*\n(.*?)(?:```|\Z)", re.S)
_LINE_NO = re.compile(r"^\s*\d+\|( |$)")
_DEF = re.compile(r"^(\s*)(async\s+)?def\s")


def names_identifier(answer: str, name: str) -> bool:
    """True when `name` occurs in `answer` as a whole identifier (not inside a longer one)."""
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", answer) is not None


def first_code_block(answer: str) -> str | None:
    """The body of the first ``` fenced block (an unclosed block runs to the end), or None.
    Line-number prefixes of the packed layout ("12| ") are removed."""
    m = _FENCE.search(answer)
    if m is None:
        return None
    return "\n".join(_LINE_NO.sub("", line) for line in m.group(1).split("\n"))


def first_function(code: str) -> str | None:
    """The first `def` in code and its indented body, or None when there is no def."""
    lines = code.split("\n")
    start = next((i for i, ln in enumerate(lines) if _DEF.match(ln)), None)
    if start is None:
        return None
    indent = len(_DEF.match(lines[start]).group(1))
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent):
        end += 1
    return "\n".join(lines[start:end]).rstrip()


def sentence_bleu(reference: str, hypothesis: str, k: int = 5) -> float:
    """BLEU-4 of hypothesis against one reference, whitespace tokens, smoothing method4 (k).

    0.0 when the hypothesis is empty or shares no unigram with the reference.
    """
    ref, hyp = reference.split(), hypothesis.split()
    if not hyp:
        return 0.0
    precisions = [_modified_precision(ref, hyp, n) for n in range(1, 5)]
    if precisions[0][0] == 0:
        return 0.0
    smoothed, inc = [], 1
    for clipped, total in precisions:
        if clipped == 0 and len(hyp) > 1:
            smoothed.append((1 / (2 ** inc * k / math.log(len(hyp)))) / total)
            inc += 1
        else:
            smoothed.append(clipped / total)
    if any(p <= 0 for p in smoothed):
        return 0.0
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(sum(0.25 * math.log(p) for p in smoothed))


def _modified_precision(ref: list[str], hyp: list[str], n: int) -> tuple[int, int]:
    """(clipped n-gram matches, hypothesis n-grams), unreduced: smoothing reads the denominator."""
    hyp_counts = Counter(tuple(hyp[i: i + n]) for i in range(len(hyp) - n + 1))
    ref_counts = Counter(tuple(ref[i: i + n]) for i in range(len(ref) - n + 1))
    clipped = sum(min(c, ref_counts[g]) for g, c in hyp_counts.items())
    return clipped, max(1, sum(hyp_counts.values()))


def repoqa_pass(answer: str, gold: str, needles: list[str], threshold: float = BLEU_PASS) -> tuple[bool, float]:
    """RepoQA's rule: the first code block's first function must match `gold` with BLEU >= threshold
    and no other needle of the run (`needles`, gold included) may match it better.

    Returns (pass, BLEU against gold); (False, 0.0) without a code block or a function in it.
    """
    block = first_code_block(answer)
    fn = first_function(block) if block is not None else None
    if not fn:
        return False, 0.0
    score = sentence_bleu(dedent(gold), dedent(fn))
    best = max((sentence_bleu(dedent(n), dedent(fn)) for n in needles), default=score)
    return score >= threshold and score >= best, score


def file_ranking(citations) -> list[str]:
    """Distinct cited paths in citation order (the first citation of a file sets its rank)."""
    return list(dict.fromkeys(c.path for c in citations))


def gold_rank(citations, path: str) -> int | None:
    """1-based rank of `path` among the cited files, or None when it is not cited."""
    ranking = file_ranking(citations)
    return ranking.index(path) + 1 if path in ranking else None


def hit_at(rank: int | None, k: int) -> float:
    """1.0 when the gold rank is within the first k, else 0.0."""
    return 1.0 if rank is not None and rank <= k else 0.0


def reciprocal_rank(rank: int | None) -> float:
    return 1.0 / rank if rank else 0.0


def overlaps(citation, path: str, start: int, end: int) -> bool:
    """True when the citation is in `path` and shares a line with start..end."""
    return citation.path == path and citation.start_line <= end and citation.end_line >= start


def line_scores(citations, path: str, start: int, end: int) -> tuple[float, float]:
    """(precision, recall) of the lines cited in `path` against the gold lines start..end.

    precision = gold lines cited / lines cited in the gold file (0.0 when none are cited there);
    recall = gold lines cited / gold lines.
    """
    cited = {ln for c in citations if c.path == path for ln in range(c.start_line, c.end_line + 1)}
    gold = set(range(start, end + 1))
    hit = len(cited & gold)
    return (hit / len(cited) if cited else 0.0), hit / len(gold)


def bogus_count(citations, source_map) -> int:
    """Citations whose path or lines the pack's source map does not resolve (must be 0)."""
    return sum(1 for c in citations
               if c.start_line > c.end_line or not source_map.has(c.path, c.start_line)
               or not source_map.has(c.path, c.end_line))


def mean(values) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None
