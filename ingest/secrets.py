"""Find secret values inside text and redact them in place, keeping every line where it was.

Kinds (the name shown as `[REDACTED:kind]`):
- private-key: a PEM/OpenSSH/PGP private key block, BEGIN line to END line (or to the end of the
  text when the END line is missing); the whole block is replaced, its line breaks kept;
- aws-access-key-id (AKIA/ASIA/... + 16), aws-secret-key (40 base64 characters assigned to a
  name such as aws_secret_access_key or SecretAccessKey), github-token (ghp_/gho_/ghu_/ghs_/ghr_,
  github_pat_), slack-token (xox?-), slack-webhook, stripe-key (sk_/rk_ live/test), api-key
  (sk-..., e.g. OpenAI/Anthropic), google-api-key (AIza...);
- assigned-secret: the value assigned to a name containing password, passwd, secret, token,
  api_key/apikey, private_key or credential, when the value looks random: at least 16 characters,
  no spaces, letters and digits not only in separate words (my-app-2024 is a name), Shannon entropy >= 3.5 bits per character, not a URL or a
  placeholder; unquoted values must also not look like a dotted name or a call.

Only the secret value is replaced; the name it is assigned to stays. It knows nothing about files.
"""

from __future__ import annotations

import math
import re
from collections import Counter

_KEY = r"[A-Z ]*PRIVATE KEY(?: BLOCK)?-----"
PATTERNS: tuple[tuple[str, re.Pattern], ...] = (
    ("private-key", re.compile(rf"-----BEGIN {_KEY}[\s\S]*?(?:-----END {_KEY}|\Z)")),
    ("aws-access-key-id", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b")),
    ("aws-secret-key", re.compile(r"(?i)(?:aws_?secret(?:_?access)?_?key|secret_?access_?key)[\"']?\s*(?:=|:|=>)\s*"
                                  r"[\"']?(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])")),
    ("github-token", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b")),
    ("slack-token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b")),
    ("slack-webhook", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}")),
    ("stripe-key", re.compile(r"\b[sr]k_(?:live|test)_[A-Za-z0-9]{16,}\b")),
    ("api-key", re.compile(r"\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{32,}\b")),
    ("google-api-key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b")),
)
_ASSIGNED = re.compile(
    r"(?i)\b[\w.-]*?(?:password|passwd|secret|token|api_?key|private_?key|credential)[\w-]*[\"']?"
    r"[ \t]*(?:=|:|:=|=>)[ \t]*(?:(?P<q>[\"'])(?P<v>[^\"'\s]{16,})(?P=q)|(?P<u>[^\s\"'`,;()]{16,}))")
_WORDY = re.compile(r"(?:[A-Za-z]+|[0-9]+)(?:[-_][A-Za-z]+|[-_][0-9]+)*")
_KEYWORDS = re.compile(r"(?i)password|passwd|secret|token|api_?key|private_?key|credential")
_PLACEHOLDER = re.compile(r"(?i)\$\{|\{\{|%\(|<[a-z_]+>|xxxx|changeme|example|your[_-]|placeholder|dummy")
MIN_ENTROPY = 3.5


def redact(text: str) -> tuple[str, list[tuple[int, str]]]:
    """(text with secret values replaced by [REDACTED:kind], [(1-based line, kind)] in text order).

    Line breaks inside a redacted value are kept, so every other line keeps its number.
    """
    spans = _spans(text)
    if not spans:
        return text, []
    parts, hits, pos = [], [], 0
    for start, end, kind in spans:
        secret = text[start:end]
        parts += [text[pos:start], f"[REDACTED:{kind}]" + "\n" * secret.count("\n")]
        hits.append((text.count("\n", 0, start) + 1, kind))
        pos = end
    parts.append(text[pos:])
    return "".join(parts), hits


def find(text: str) -> str | None:
    """The kind of the first secret in text (e.g. a file name), or None."""
    spans = _spans(text)
    return spans[0][2] if spans else None


def _spans(text: str) -> list[tuple[int, int, str]]:
    found = []
    for kind, rx in PATTERNS:
        for m in rx.finditer(text):
            group = "v" if "v" in rx.groupindex else 0
            found.append((m.start(group), m.end(group), kind))
    for m in _ASSIGNED.finditer(text) if _KEYWORDS.search(text) else ():
        group = "v" if m.group("v") else "u"
        if _random_value(m.group(group), quoted=group == "v"):
            found.append((m.start(group), m.end(group), "assigned-secret"))
    return _disjoint(found)


def _disjoint(spans: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(spans, key=lambda s: (s[0], -s[1])):
        if out and start < out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end, out[-1][2])
            continue
        out.append((start, end, kind))
    return out


def _random_value(value: str, quoted: bool) -> bool:
    if "://" in value or _PLACEHOLDER.search(value):
        return False
    if _WORDY.fullmatch(value) or not (any(c.isdigit() for c in value) and any(c.isalpha() for c in value)):
        return False
    if not quoted and ("." in value or value.startswith(("$", "%", "@"))):
        return False
    return entropy(value) >= MIN_ENTROPY


def entropy(value: str) -> float:
    """Shannon entropy of value in bits per character."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())
