"""Opt-in routing capture: which blocks the gate picked for a span of query positions.

A `RoutingRecorder` is made active with `capture_routing(recorder)`. While none is active the
attention function pays one ContextVar lookup. While one is active, every layer whose queries
overlap the recorder's span stores the attended block ids and gate scores of those queries, and
the attention probabilities the layer really computed (a dense layer: over all past keys; a MoBA
layer: over its attended keys) are added into a per-key mass vector, each query head weighted by
`head_weights` when set (used to narrow citations to lines). With `per_head` on it also sums, per
(layer, query head), that attention mass per key block and the gate's softmax over past blocks: the
evidence that calibrated citation weights read.

The mass is computed late: a layer call only keeps its recorded queries (and a reference to its
keys), and `finish()` (run when `capture_routing` exits, or once a layer holds PENDING_BYTES of
queries) computes every query of a layer in one batch against the layer's last keys. A recorded
query at position p attends keys <= p, which later calls only append to, so the result is the
same as computing it call by call, with a few batched operations instead of dozens per layer per
decoded token, and no device-to-host copy before the end. Knows nothing of files.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from moba.routing import block_means, gate_scores
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


MASS, GATE = "mass", "gate"
SIGNALS = (MASS, GATE)
_CHUNK = 1 << 22  # elements of one fp32 scratch tile (16 MiB): bounds memory at any context length
PENDING_BYTES = 1 << 28  # recorded queries a layer keeps before its mass is computed early


@dataclass
class _Pending:
    """Recorded queries of one layer whose mass is not computed yet, and the layer's latest keys."""

    queries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]  # (q [Hq, n, D], positions [n], blocks)
    key: torch.Tensor  # [Hkv, Tk, D], the longest seen
    means: torch.Tensor | None  # cached block means [1, Hkv, n_blocks, D] that came with `key`, if any
    block_size: int
    scale: float
    head_offset: int = 0
    nbytes: int = 0


@dataclass
class RoutingRecorder:
    """Collects routing for query positions in [start, end) (end None = no upper bound).

    layers: layer indices to record, None for all. key_mass: fp32 [Tk] attention mass that the
    recorded queries put on each key position, summed over layers, heads and queries, each query
    head weighted by head_weights[layer, head] when head_weights (fp32 [n_layers, Hq]) is set.
    per_head: also keep `head_mass` and `gate_mass` (layer -> fp32 [Hq, n_blocks], see `evidence`).
    tail_start: when set, the mass of the recorded queries at positions >= tail_start is also kept apart in
    `tail_mass` (fp32 [Tk], weighted as key_mass): a caller's later part of the span, e.g. an answer after
    its question.
    head_keys: also keep, per layer, every query head's own key mass of the queries before tail_start (all of
    them without a tail) in `head_keys_mass` (layer -> fp32 [Hq, Tk], on the device that computed it): what
    calibrating line weights reads (`question_head_mass`). Rows are this process's query heads (a tensor-parallel
    rank keeps its own; they are not gathered). Memory: layers x heads x Tk x 4 bytes.
    """

    start: int = 0
    end: int | None = None
    layers: set[int] | None = None
    block_size: int | None = None
    per_head: bool = False
    head_weights: torch.Tensor | None = None
    tail_start: int | None = None
    head_keys: bool = False
    records: dict[int, list[LayerRecord]] = field(default_factory=dict)
    key_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    tail_mass: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    head_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    head_keys_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    _pending: dict[int, _Pending] = field(default_factory=dict, repr=False)

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
            blocks=routing.blocks[0, :, lo:hi].to(torch.int32),
            scores=routing.scores[0, :, lo:hi].float(),
            dense=dense,
        )
        self.records.setdefault(layer, []).append(rec)
        return slice(lo, hi)

    def defer(self, layer: int, q: torch.Tensor, positions: torch.Tensor, key: torch.Tensor,
              means: torch.Tensor | None, blocks: torch.Tensor | None, *, block_size: int, scale: float,
              head_offset: int = 0) -> None:
        """Keep recorded queries q [Hq, n, D] at `positions` [n] of one layer call with keys key [Hkv, Tk, D]
        (the call's cached block means, if any), attending all past keys (blocks None: a dense layer) or
        the key blocks `blocks` [Hq, n, S]; their mass is added by `finish`. head_offset: the global index
        of the first of the Hq heads when heads are sharded over processes (`head_weights` rows are global)."""
        p = self._pending.get(layer)
        if p is None or (p.block_size, p.scale, p.head_offset) != (block_size, scale, head_offset):
            self._flush(layer)
            p = self._pending[layer] = _Pending([], key, means, block_size, scale, head_offset)
        if key.shape[1] >= p.key.shape[1]:
            p.key, p.means = key, means
        p.queries.append((q, positions, blocks))
        p.nbytes += q.numel() * q.element_size()
        if p.nbytes >= PENDING_BYTES:
            self._flush(layer)

    def finish(self) -> None:
        """Compute the mass of every deferred query and move the records to the CPU (idempotent)."""
        for layer in list(self._pending):
            self._flush(layer)
        for recs in self.records.values():
            for r in recs:
                r.blocks, r.scores = r.blocks.cpu(), r.scores.cpu()

    def _flush(self, layer: int) -> None:
        p = self._pending.pop(layer, None)
        if p is None:
            return
        for dense in (True, False):
            group = [x for x in p.queries if (x[2] is None) == dense]
            if group:
                self._add_mass(layer, p, group, dense)

    def _add_mass(self, layer: int, p: _Pending, group: list, dense: bool) -> None:
        q = torch.cat([x[0] for x in group], 1)
        positions = torch.cat([x[1] for x in group]).to(q.device)
        blocks = None  # a dense layer's queries attend every past key
        if not dense:
            width = max(x[2].shape[-1] for x in group)
            blocks = torch.cat([torch.nn.functional.pad(x[2], (0, width - x[2].shape[-1]), value=-1) for x in group], 1)
        heads = slice(p.head_offset, p.head_offset + q.shape[0])
        w = None if self.head_weights is None else self.head_weights[layer, heads].to(q.device)

        def weighted(m: torch.Tensor) -> torch.Tensor:
            return m.sum(0) if w is None else w @ m

        mass, tail, question = self._masses(p, q, positions, blocks)
        if tail is not None:
            self.tail_mass = _grow_add(self.tail_mass, weighted(tail).float().cpu())
        self.add_key_mass(weighted(mass))
        if self.head_keys and question is not None:
            self.head_keys_mass[layer] = _grow_add(self.head_keys_mass.get(layer), question)
        if self.per_head:
            n_full = p.key.shape[1] // p.block_size
            means = block_means(p.key[None], p.block_size)[0] if p.means is None else p.means[0, :, :n_full]
            self.add_head_evidence(layer, block_sum(mass, p.block_size),
                                   gate_block_mass(q, positions, means, p.block_size, p.scale))

    def _masses(self, p: _Pending, q, positions, blocks):
        """fp32 [Hq, Tk] mass of all the queries, of those at or after tail_start, and of those before it
        (None where there are no such queries)."""
        tail = None if self.tail_start is None else positions >= self.tail_start
        if tail is None or not tail.any():
            mass = _key_mass(p, q, positions, blocks)
            return mass, None, mass
        if tail.all():
            mass = _key_mass(p, q, positions, blocks)
            return mass, mass, None
        head, rest = (_key_mass(p, q[:, part], positions[part], None if blocks is None else blocks[:, part])
                      for part in (~tail, tail))
        return head + rest, rest, head

    def add_key_mass(self, mass: torch.Tensor) -> None:
        """Add a [Tk] mass vector (any device) into key_mass, growing it as needed."""
        self.key_mass = _grow_add(self.key_mass, mass.float().cpu())

    def add_head_evidence(self, layer: int, mass: torch.Tensor, gate: torch.Tensor) -> None:
        """Add [Hq, n_blocks] block mass and gate mass (any device) of one layer's recorded queries."""
        for store, x in ((self.head_mass, mass), (self.gate_mass, gate)):
            store[layer] = _grow_add(store.get(layer), x.float().cpu())

    def evidence(self, signal: str = MASS) -> torch.Tensor:
        """fp32 [n_layers, Hq, n_blocks] per-head evidence over key blocks, summed over recorded queries.

        "mass": the attention probability on the block's keys; "gate": the gate's softmax over past
        complete blocks (q . block mean, scaled as the attention logits). Layers never recorded are
        zero rows. Empty [0, 0, 0] when nothing was recorded per head.
        """
        if signal not in SIGNALS:
            raise ValueError(f"unknown evidence signal {signal!r}; use one of {', '.join(SIGNALS)}")
        store = self.head_mass if signal == MASS else self.gate_mass
        return _stacked(store, max(store, default=-1) + 1)

    def question_head_mass(self, n_layers: int) -> torch.Tensor:
        """fp32 [n_layers, Hq, Tk] per-head key mass of the queries before tail_start (`head_keys`); layers
        never recorded are zero. Empty [0, 0, 0] when none was kept."""
        return _stacked(self.head_keys_mass, n_layers)

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
    """Make `recorder` active for MoBA attention calls inside the `with` block; on exit its deferred
    mass is computed (`RoutingRecorder.finish`)."""
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)
        recorder.finish()


def active_recorder() -> RoutingRecorder | None:
    return _ACTIVE.get()


def _key_mass(p: _Pending, q, positions, blocks) -> torch.Tensor:
    """fp32 [Hq, Tk]: `dense_key_mass` (blocks None) or `head_key_mass` of queries q at `positions`."""
    if blocks is None:
        return dense_key_mass(q, positions, p.key, p.scale)
    return head_key_mass(q, positions, p.key, blocks, p.block_size, p.scale)


def _stacked(store: dict[int, torch.Tensor], n_layers: int) -> torch.Tensor:
    """layer -> [H, n] as one [n_layers, H, max n] tensor on the store's device, zero where a layer or a
    position is missing; empty [0, 0, 0] for an empty store."""
    if not store:
        return torch.zeros(0, 0, 0)
    some = next(iter(store.values()))
    out = torch.zeros(n_layers, some.shape[0], max(x.shape[-1] for x in store.values()), device=some.device)
    for layer, x in store.items():
        out[layer, :, : x.shape[-1]] = x
    return out


def _grow_add(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """acc + x along the last dim, zero-padding the shorter one."""
    if acc is None:
        return x.clone()
    if x.shape[-1] > acc.shape[-1]:
        acc = torch.nn.functional.pad(acc, (0, x.shape[-1] - acc.shape[-1]))
    acc[..., : x.shape[-1]] += x
    return acc


def attention_mass(q, positions, k, blocks, block_size: int, scale: float) -> torch.Tensor:
    """fp32 [Tk] attention probability mass that queries q [Hq, n, D] put on each key of k
    [Hkv, Tk, D] over the keys their `blocks` attend, summed over heads (see `head_key_mass`)."""
    return head_key_mass(q, positions, k, blocks, block_size, scale).sum(0)


def head_key_mass(q, positions, k, blocks, block_size: int, scale: float) -> torch.Tensor:
    """fp32 [Hq, Tk] attention probability mass that queries q [Hq, n, D] at absolute `positions` [n]
    put on each key of k [Hkv, Tk, D], over the keys their `blocks` [Hq, n, S] attend (own block
    causal, routed, sinks), summed over queries: what a MoBA layer computed.

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
    head_off = (torch.arange(Hq, device=q.device) * Tk)[:, None, None]
    mass = torch.zeros(Hq * Tk, device=q.device)
    budget = _CHUNK * (16 if q.is_cuda else 1)  # one query a chunk on a GPU would make the mass a Python loop
    step = max(1, budget // (Hq * max(S, 1) * len(offs) * D))
    for i0 in range(0, n, step):
        b = blocks[:, i0 : i0 + step]  # [Hq, c, S]
        idx = b.clamp(min=0)[..., None] * block_size + offs  # [Hq, c, S, bs]
        valid = (b[..., None] >= 0) & (idx <= positions[i0 : i0 + step, None, None])
        idx = idx.clamp(max=Tk - 1).flatten(2)  # [Hq, c, S*bs]
        s = torch.einsum("hcd,hckd->hck", q[:, i0 : i0 + step].float(), k[kv_head, idx].float()) * scale
        p = s.masked_fill(~valid.flatten(2), float("-inf")).softmax(-1)
        mass.index_add_(0, (idx + head_off).flatten(), p.flatten())
    return mass.view(Hq, Tk)


def dense_key_mass(q, positions, k, scale: float) -> torch.Tensor:
    """fp32 [Hq, Tk] causal softmax mass of queries q [Hq, n, D] at absolute `positions` [n] over ALL
    their past keys of k [Hkv, Tk, D], summed over queries: what a dense layer computed.

    Two passes over (query, key) tiles, so memory stays bounded at any length: the first finds each
    row's log-sum-exp, the second adds exp(logit - lse).
    """
    Hq, n, D = q.shape
    Tk = k.shape[1]
    kk = k.repeat_interleave(Hq // k.shape[0], 0) if k.shape[0] != Hq else k  # [Hq, Tk, D]
    positions = positions.to(q.device)
    qc = max(1, min(n, 64))
    kc = max(1, _CHUNK // (Hq * qc))
    mass = torch.zeros(Hq, Tk, device=q.device)
    for i0 in range(0, n, qc):
        qi, pos = q[:, i0 : i0 + qc].float() * scale, positions[i0 : i0 + qc, None]
        tiles = [(j0, min(j0 + kc, Tk)) for j0 in range(0, Tk, kc)]

        def logits(j0, j1, qi=qi, pos=pos):
            s = torch.einsum("hcd,hkd->hck", qi, kk[:, j0:j1].float())
            return s.masked_fill(torch.arange(j0, j1, device=q.device)[None, :] > pos, float("-inf"))

        lse = torch.stack([logits(j0, j1).logsumexp(-1) for j0, j1 in tiles]).logsumexp(0)  # [Hq, c]
        for j0, j1 in tiles:
            mass[:, j0:j1] += (logits(j0, j1) - lse[..., None]).exp().sum(1)
    return mass


def block_sum(mass: torch.Tensor, block_size: int) -> torch.Tensor:
    """[H, Tk] per-key mass -> [H, ceil(Tk / block_size)] per-block mass (the tail block included)."""
    H, Tk = mass.shape
    block_size = min(block_size, max(Tk, 1))  # one block holds every key: pad to Tk, not to block_size
    nb = -(-Tk // block_size)
    return torch.nn.functional.pad(mass, (0, nb * block_size - Tk)).view(H, nb, block_size).sum(-1)


def gate_block_mass(q, positions, means, block_size: int, scale: float) -> torch.Tensor:
    """fp32 [Hq, n_full] gate evidence: per query, softmax over its past complete blocks of
    scale * q . block mean (means [Hkv, n_full, D]), summed over queries [Hq, n, D] at `positions`.
    A query with no past block adds nothing."""
    Hq, n, _ = q.shape
    n_full = means.shape[1]
    out = torch.zeros(Hq, n_full, device=q.device)
    if n_full == 0:
        return out
    own = positions.to(q.device) // block_size
    step = max(1, _CHUNK // (Hq * n_full))
    for i0 in range(0, n, step):
        g = gate_scores(q[None, :, i0 : i0 + step], means[None].float())[0] * scale  # [Hq, c, n_full]
        past = torch.arange(n_full, device=q.device)[None, :] < own[i0 : i0 + step, None]
        p = g.masked_fill(~past, float("-inf")).softmax(-1)
        out += p.nan_to_num(0.0).sum(1)
    return out
