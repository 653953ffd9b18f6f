"""Per-model citation head weights: which (layer, query head) pairs of a model retrieve, as JSON data
shipped under agent/heads/ and written by `moba-ask calibrate`.

Weights hold for the block size they were calibrated at: `<name>.json` for the model's usual size,
`<name>@<block size>.json` beside it for another. A weights file holds the model's identity (name and
config dims), the MoBA block size and the evidence signal ("mass" or "gate") it was calibrated on, and a
sparse list [[layer, head, w], ...] of the heads that pick the cited blocks. An optional "lines" section
holds the heads whose question mass picks a block's lines and the line selection calibrated with them
(`LineWeights`); without it lines are picked by the block weights under the default selection.
`for_model` looks a loaded model's file up and checks it against the model; a missing, unreadable
or mismatched file gives no weights and a one-line note saying why, never an exception. Knows
nothing of attention or files beyond these numbers.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moba.capture import SIGNALS

HEADS_DIR = Path(__file__).with_name("heads")
FORMAT = 1
_NOTED: set[str] = set()


class WeightsError(ValueError):
    """A weights file that cannot be used; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class LineWeights:
    """The heads whose question mass narrows a cited block to its lines ((layer, head, w), ..., w > 0,
    summing to 1), and the line selection (`agent.citations.cite_blocks`) calibrated with them."""

    weights: tuple[tuple[int, int, float], ...]
    top_n: int
    max_lines: int
    keep_share: float
    meta: dict = field(default_factory=dict)

    def selection(self) -> dict:
        return dict(top_n=self.top_n, max_lines=self.max_lines, keep_share=self.keep_share)

    def to_json(self) -> dict:
        return {"weights": [[lay, h, round(w, 6)] for lay, h, w in self.weights], **self.selection(), **self.meta}


@dataclass(frozen=True)
class HeadWeights:
    """Calibrated weights of one model.

    layers, heads: the model's layer and query-head counts. weights: ((layer, head, w), ...), w > 0,
    summing to 1. signal: the evidence they weigh ("mass" or "gate"). meta: everything else the file
    records (identity, calibration repos, metrics, date), kept as written.
    """

    model: str
    block_size: int
    signal: str
    layers: int
    heads: int
    weights: tuple[tuple[int, int, float], ...]
    qa_policy: str = "moba"
    meta: dict = field(default_factory=dict)
    lines: LineWeights | None = None

    def matrix(self) -> torch.Tensor:
        """fp32 [layers, heads] block weights, zero for heads not listed."""
        return self._dense(self.weights)

    def line_matrix(self) -> torch.Tensor:
        """fp32 [layers, heads] weights of the key mass that picks a block's lines: the line heads when
        calibrated, else the block weights."""
        return self._dense(self.lines.weights if self.lines else self.weights)

    def selection(self) -> dict:
        """The line selection citations use (`agent.citations.cite_blocks` keywords; {} for its defaults)."""
        return self.lines.selection() if self.lines else {}

    def _dense(self, rows) -> torch.Tensor:
        w = torch.zeros(self.layers, self.heads)
        for layer, head, x in rows:
            w[layer, head] = x
        return w

    def to_json(self) -> dict:
        lines = {"lines": self.lines.to_json()} if self.lines else {}
        return {"format": FORMAT, "model": self.model, "block_size": self.block_size, "signal": self.signal,
                "qa_policy": self.qa_policy, "layers": self.layers, "heads": self.heads,
                "weights": [[lay, h, round(w, 6)] for lay, h, w in self.weights], **lines, **self.meta}


def parse(doc, source: str = "weights") -> HeadWeights:
    """A HeadWeights from a decoded JSON document. Raises WeightsError naming the bad field."""
    if not isinstance(doc, dict):
        raise WeightsError(f"{source}: expected a JSON object; re-run moba-ask calibrate")
    try:
        layers, heads, bs = int(doc["layers"]), int(doc["heads"]), int(doc["block_size"])
        signal, model = str(doc["signal"]), str(doc["model"])
        rows = tuple((int(a), int(b), float(w)) for a, b, w in doc["weights"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: missing or malformed field ({e}); re-run moba-ask calibrate") from None
    if signal not in SIGNALS:
        raise WeightsError(f"{source}: unknown signal {signal!r} (use {' or '.join(SIGNALS)})")
    if min(layers, heads, bs) < 1:
        raise WeightsError(f"{source}: layers, heads and block_size must be >= 1; re-run moba-ask calibrate")
    _check_rows(rows, layers, heads, source, "weights")
    lines = _parse_lines(doc["lines"], layers, heads, source) if "lines" in doc else None
    meta = {k: v for k, v in doc.items() if k not in
            {"format", "model", "block_size", "signal", "qa_policy", "layers", "heads", "weights", "lines"}}
    return HeadWeights(model, bs, signal, layers, heads, rows, str(doc.get("qa_policy", "moba")), meta, lines)


def _check_rows(rows, layers: int, heads: int, source: str, name: str) -> None:
    bad = [r for r in rows if not (0 <= r[0] < layers and 0 <= r[1] < heads and r[2] > 0)]
    if not rows or bad:
        raise WeightsError(f"{source}: {name} must be [layer, head, w > 0] inside {layers} layers x {heads} heads"
                           f"{f', got {list(bad[0])}' if bad else ''}; re-run moba-ask calibrate")


def _whole(x) -> int:
    if isinstance(x, bool) or not float(x).is_integer():
        raise ValueError(f"{x!r} is not a whole number")
    return int(x)


def _parse_lines(doc, layers: int, heads: int, source: str) -> LineWeights:
    """The "lines" section: line heads and the selection calibrated with them."""
    try:
        rows = tuple((int(a), int(b), float(w)) for a, b, w in doc["weights"])
        top_n, max_lines, keep = _whole(doc["top_n"]), _whole(doc["max_lines"]), float(doc["keep_share"])
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: missing or malformed lines field ({e}); re-run moba-ask calibrate") from None
    _check_rows(rows, layers, heads, source, "lines.weights")
    if min(top_n, max_lines) < 1 or not 0.0 <= keep <= 1.0:
        raise WeightsError(f"{source}: lines needs top_n >= 1, max_lines >= 1 and 0 <= keep_share <= 1, got "
                           f"{top_n}, {max_lines}, {keep}; re-run moba-ask calibrate")
    meta = {k: v for k, v in doc.items() if k not in {"weights", "top_n", "max_lines", "keep_share"}}
    return LineWeights(rows, top_n, max_lines, keep, meta)


def read(path: Path) -> HeadWeights:
    """Parse one weights file. Raises WeightsError on an unreadable file, bad JSON or bad fields."""
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: not readable JSON ({str(e).splitlines()[0]}); re-run moba-ask calibrate "
                           "or delete it") from None
    return parse(doc, str(path))


def check(hw: HeadWeights, *, layers: int, heads: int, block_size: int, source: str) -> None:
    """Raise WeightsError when hw does not fit a model of `layers` x `heads` run at `block_size`."""
    if (hw.layers, hw.heads) != (layers, heads):
        raise WeightsError(f"{source}: calibrated for {hw.layers} layers x {hw.heads} heads, the model has "
                           f"{layers} x {heads}; re-run moba-ask calibrate for this model")
    if hw.block_size != block_size:
        raise WeightsError(f"{source}: calibrated at block size {hw.block_size}, this run uses {block_size}; "
                           f"use --block-size {hw.block_size} or calibrate at {block_size}")


def path_for(model: str, block_size: int | None = None) -> Path:
    """Where the shipped weights of a catalog model live (the file may not exist): the file for
    `block_size` when one ships, else the model's usual file."""
    sized = HEADS_DIR / f"{model}@{block_size}.json"
    return sized if block_size is not None and sized.is_file() else HEADS_DIR / f"{model}.json"


def for_model(model: str, *, layers: int, heads: int, block_size: int) -> tuple[HeadWeights | None, str]:
    """(weights, "") for a model with a usable file, else (None, a one-line note on the fallback)."""
    from agent.catalog import CATALOG

    fallback = "citations weigh every attention head equally"
    path = path_for(model, block_size)
    if model not in CATALOG or not path.is_file():
        return None, f"no calibrated citation weights for {model}; {fallback}"
    try:
        hw = read(path)
        check(hw, layers=layers, heads=heads, block_size=block_size, source=str(path))
    except WeightsError as e:
        return None, f"{e}; {fallback}"
    return hw, ""


UNIFORM = "uniform"


def chosen(spec: str | None, model: str, *, layers: int, heads: int, block_size: int) -> tuple[HeadWeights | None, str]:
    """The weights a run asked for: spec None -> `for_model` (fallback with a note); "uniform" -> (None,
    ""); else the file at spec, which must fit the model. Raises WeightsError for a file that does not."""
    if spec is None:
        return for_model(model, layers=layers, heads=heads, block_size=block_size)
    if spec == UNIFORM:
        return None, ""
    hw = read(Path(spec))
    check(hw, layers=layers, heads=heads, block_size=block_size, source=spec)
    return hw, ""


def note_once(message: str) -> None:
    """Print `moba-ask: note: <message>` on stderr, once per process per message."""
    if message and message not in _NOTED:
        _NOTED.add(message)
        print(f"moba-ask: note: {message}", file=sys.stderr, flush=True)
