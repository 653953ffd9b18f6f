"""Attention configs of the evaluation as a small spec language.

A config is "dense", "moba", or "moba:" followed by key=value pairs joined by "+":

    dense                          every layer exact SDPA (the gate is still scored: routing citations)
    moba                           MoBA in every layer, the base settings (--block-size, --top-k, ...)
    moba:qa=dense+dense=last3      MoBA, question/answer tokens dense, the last 3 layers dense
    moba:block=512+topk=3          another block size and top-k
    moba-hybrid                    alias of moba:dense=last3

A list is comma-separated; a comma followed by a layer item (an integer, firstN, lastN, none)
continues a dense= value, so "moba:dense=first2,last2,dense" is two configs. Keys are the short
names of KEYS or any AskConfig field that is a MoBA setting; they are looked up in
`dataclasses.fields(AskConfig)` when parsed, so a field added there works here at once. The spec
string is the config's name in the reports. Knows nothing of models or tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from agent.config import AskConfig, parse_layers

KEYS = {"qa": "qa_policy", "dense": "dense_layers", "block": "block_size", "topk": "top_k", "sinks": "sink_blocks",
        "local": "local_blocks", "sub": "gate_subblocks"}
ALIASES = {"moba-hybrid": "moba:dense=last3"}
NOT_ATTENTION = frozenset({"model", "attention", "max_tokens", "max_new_tokens", "temperature", "top_p", "no_cache",
                           "device", "chunk_size", "dtype"})
_LAYER_ITEM = re.compile(r"^\s*(-?\d+|first\d*|last\d*|none)\s*$")


@dataclass(frozen=True)
class ConfigSpec:
    """name: the spec as written (the report's name); overrides: AskConfig field -> value."""

    name: str
    attention: str
    overrides: tuple[tuple[str, object], ...] = ()

    def apply(self, base: AskConfig) -> AskConfig:
        """base with this config's attention and overrides, no context cache; a moba config without
        dense= has no dense layers. Raises ValueError (AskConfig's check) naming the config."""
        kw = dict(self.overrides)
        kw.setdefault("dense_layers", ())
        try:
            return replace(base, attention=self.attention, no_cache=True, **kw)
        except ValueError as e:
            raise ValueError(f"attention config {self.name!r}: {e}") from None


def parse_specs(text: str) -> list[ConfigSpec]:
    """"dense,moba:qa=dense" -> [ConfigSpec, ...]. Raises ValueError naming the bad config or key."""
    items = _split(text)
    if not items:
        raise ValueError(f"no attention config in {text!r}: use e.g. dense,moba,moba:qa=dense")
    specs = [parse_spec(x) for x in items]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"attention config {dup!r} listed twice in {text!r}")
    return specs


def parse_spec(text: str) -> ConfigSpec:
    """One config spec -> ConfigSpec. Raises ValueError naming the problem and the fix."""
    name = text.strip()
    body = ALIASES.get(name, name)
    if body in ("dense", "moba"):
        return ConfigSpec(name, body)
    head, sep, pairs = body.partition(":")
    if head != "moba" or not sep:
        raise ValueError(f"unknown attention config {name!r}: use dense, moba, moba-hybrid or "
                         "moba:key=value+key=value (keys: " + ", ".join(KEYS) + ")")
    overrides: dict[str, object] = {}
    for pair in pairs.split("+"):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"attention config {name!r}: {pair!r} is not key=value (e.g. moba:qa=dense+topk=3)")
        field = _field(key.strip(), name)
        if field in overrides:
            raise ValueError(f"attention config {name!r}: {key.strip()} given twice")
        overrides[field] = _value(field, value.strip(), name)
    spec = ConfigSpec(name, "moba", tuple(overrides.items()))
    spec.apply(AskConfig())  # AskConfig's own checks (qa=auto, topk=0...) now, not after a model load
    return spec


def _split(text: str) -> list[str]:
    out: list[str] = []
    for item in text.split(","):
        if out and _LAYER_ITEM.match(item) and "dense=" in out[-1].rsplit("+", 1)[-1]:
            out[-1] += "," + item.strip()
        elif item.strip():
            out.append(item.strip())
    return out


def _field(key: str, name: str) -> str:
    known = {f.name for f in fields(AskConfig)} - NOT_ATTENTION
    field = KEYS.get(key, key)
    if field not in known:
        what = f"{key} (AskConfig.{field} does not exist yet)" if key in KEYS else f"key {key!r}"
        raise ValueError(f"attention config {name!r}: unknown {what}; keys: "
                         + ", ".join(k for k, f in KEYS.items() if f in known))
    return field


def _value(field: str, text: str, name: str):
    if field == "dense_layers":
        try:
            return parse_layers(text)
        except ValueError as e:
            raise ValueError(f"attention config {name!r}: {e}") from None
    default = next(f.default for f in fields(AskConfig) if f.name == field)
    if isinstance(default, bool):
        if text.lower() not in ("1", "0", "true", "false", "on", "off"):
            raise ValueError(f"attention config {name!r}: {field} must be on or off, got {text!r}")
        return text.lower() in ("1", "true", "on")
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise ValueError(f"attention config {name!r}: {field} must be a number, got {text!r}") from None
    return text
