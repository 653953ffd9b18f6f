"""Opt-in routing capture: which blocks the gate picked for a span of query positions.

A `RoutingRecorder` is made active with `capture_routing(recorder)`. While none is active the
attention function pays one ContextVar lookup. While one is active, every MoBA layer whose
queries overlap the recorder's span stores, on CPU, the attended block ids and gate scores of
those queries, and adds the queries' attention probabilities over their attended keys into a
per-key mass vector (used to narrow citations to lines). Knows nothing of files.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from moba.types import Routing

_ACTIVE: ContextVar[RoutingRecorder | None] = ContextVar("moba_routing_recorder", default=None)


@dataclass
class LayerRecord:
    """Routing of the recorded queries of one forward call of one layer (CPU tensors).

    positions: int64 [n] absolute query positions. blocks: int32 [Hq, n, S]. scores: fp32 [Hq, n, S].
    dense: True when the layer computed dense attention (the gate was only scored, not used).
    """

    positions: torch.Tensor
    blocks: torch.Tensor
    scores: torch.Tensor
    dense: bool


@dataclass
class RoutingRecorder:
    """Collects routing for query positions in [start, end) (end None = no upper bound).

    layers: layer indices to record, None for all. key_mass: fp32 [Tk] attention mass that the
    recorded queries put on each key position, summed over layers, heads and queries.
    """

    start: int = 0
    end: int | None = None
    layers: set[int] | None = None
    block_size: int | None = None
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    key_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))

    def wants(self, layer: int, q_start: int, q_end: int) -> bool:
        in_layers = self.layers is None or layer in self.layers
        return in_layers and self.overlaps(q_start, q_end)

    def overlaps(self, q_start: int, q_end: int) -> bool:
        """True when query positions [q_start, q_end) meet the recorded span."""
        return q_end > self.start and (self.end is None or q_start < self.end)

    def record(self, layer: int, q_start: int, routing: Routing, *, dense: bool) -> slice:
        """Store the slice of `routing` ([1, Hq, Tq, S]) inside the span; return that query slice."""
        tq = routing.blocks.shape[2]
        lo = max(self.start - q_start, 0)
        hi = tq if self.end is None else min(self.end - q_start, tq)
        rec = LayerRecord(
            positions=torch.arange(q_start + lo, q_start + hi),
            blocks=routing.blocks[0, :, lo:hi].to("cpu", torch.int32),
            scores=routing.scores[0, :, lo:hi].float().cpu(),
            dense=dense,
        )
        self.records.setdefault(layer, []).append(rec)
        return slice(lo, hi)

    def add_key_mass(self, mass: torch.Tensor) -> None:
        """Add a [Tk] mass vector (any device) into key_mass, growing it as needed."""
        mass = mass.float().cpu()
        if mass.numel() > self.key_mass.numel():
            grown = torch.zeros(mass.numel())
            grown[: self.key_mass.numel()] = self.key_mass
            self.key_mass = grown
        self.key_mass[: mass.numel()] += mass

    def block_hits(self) -> dict[int, float]:
        """Block id -> how often it was attended as a routed or sink block, over all records."""
        hits: dict[int, float] = {}
        for recs in self.records.values():
            for rec in recs:
                ids = rec.blocks[..., 1:]
                ids = ids[ids >= 0]
                for b, n in zip(*torch.unique(ids, return_counts=True)):
                    hits[int(b)] = hits.get(int(b), 0.0) + float(n)
        return hits


@contextlib.contextmanager
def capture_routing(recorder: RoutingRecorder):
    """Make `recorder` active for MoBA attention calls inside the `with` block."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def active_recorder() -> RoutingRecorder | None:
    return _ACTIVE.get()


def attention_mass(q, positions, k, blocks, block_size: int, scale: float) -> torch.Tensor:
    """fp32 [Tk] attention probability mass that queries q [Hq, n, D] at absolute `positions` [n]
    put on each key of k [Hkv, Tk, D], over the keys their `blocks` [Hq, n, S] attend (own block
    causal, routed, sinks), summed over heads and queries.

    Work is sized by the slots in use and the keys there are: slots that are -1 for every query are
    dropped, and a block never spans more than Tk keys, however large top_k or block_size are.
    """
    Hq, n, D = q.shape
    Tk = k.shape[1]
    positions, blocks = positions.to(q.device), blocks.to(q.device)
    blocks = blocks[..., (blocks >= 0).flatten(0, 1).any(0)]
    S = blocks.shape[-1]
    kv_head = (torch.arange(Hq, device=q.device) // (Hq // k.shape[0]))[:, None, None]
    offs = torch.arange(min(block_size, Tk), device=q.device)
    mass = torch.zeros(Tk, device=q.device)
    budget = 1 << (26 if q.is_cuda else 22)  # fp32 elements of one gathered key chunk
    step = max(1, budget // (Hq * max(S, 1) * len(offs) * D))
    for i0 in range(0, n, step):
        b = blocks[:, i0 : i0 + step]  # [Hq, c, S]
        idx = b.clamp(min=0)[..., None] * block_size + offs  # [Hq, c, S, bs]
        valid = (b[..., None] >= 0) & (idx <= positions[i0 : i0 + step, None, None])
        idx = idx.clamp(max=Tk - 1).flatten(2)  # [Hq, c, S*bs]
        s = torch.einsum("hcd,hckd->hck", q[:, i0 : i0 + step].float(), k[kv_head, idx].float()) * scale
        p = s.masked_fill(~valid.flatten(2), float("-inf")).softmax(-1)
        mass.index_add_(0, idx.flatten(), p.flatten())
    return mass
