"""BM25 (Okapi) over whole files: the lexical baseline for "which file answers this question".

Terms are identifier pieces, lower-cased: `parse_args` gives parse_args, parse, args; `HTTPServer`
gives httpserver, http, server. Each document is a file's path plus its text. Knows nothing of
packing or models.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+")
_PART = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def terms(text: str) -> list[str]:
    """Identifier words and their snake/camel pieces, lower-cased, in order."""
    out = []
    for word in _WORD.findall(text):
        out.append(word.lower())
        parts = [p.lower() for p in _PART.findall(word)]
        if len(parts) > 1:
            out.extend(parts)
    return out


class BM25:
    """Okapi BM25 over documents given as {name: text}.

    k1, b: the usual saturation and length normalisation (defaults 1.5, 0.75). idf is
    ln(1 + (N - df + 0.5) / (df + 0.5)), never negative.
    """

    def __init__(self, docs: dict[str, str], k1: float = 1.5, b: float = 0.75):
        self.names = list(docs)
        self.tf = [Counter(terms(f"{name}\n{text}")) for name, text in docs.items()]
        self.len = [sum(c.values()) for c in self.tf]
        self.avg = sum(self.len) / max(len(self.len), 1)
        df = Counter(t for c in self.tf for t in c)
        n = len(self.tf)
        self.idf = {t: math.log(1 + (n - d + 0.5) / (d + 0.5)) for t, d in df.items()}
        self.k1, self.b = k1, b

    def scores(self, query: str) -> dict[str, float]:
        """Document name -> BM25 score of `query` (each query term counted once per occurrence)."""
        q = Counter(t for t in terms(query) if t in self.idf)
        out = {}
        for name, tf, length in zip(self.names, self.tf, self.len):
            norm = self.k1 * (1 - self.b + self.b * length / max(self.avg, 1e-9))
            out[name] = sum(qn * self.idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t, qn in q.items() if t in tf)
        return out

    def rank(self, query: str) -> list[str]:
        """Document names, best first (ties keep document order)."""
        s = self.scores(query)
        return sorted(self.names, key=lambda name: -s[name])
