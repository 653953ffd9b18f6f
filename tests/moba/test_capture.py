"""Per-head evidence capture: the attention mass each layer really computed, per (layer, head, block),
checked against softmaxes written out by hand; and nothing at all when capture is off."""

import inspect
import math

import pytest
import torch

import moba
from moba import capture, hf
from moba.capture import block_sum, dense_key_mass, gate_block_mass, head_key_mass
from tests.tinymodels import tiny_model


def _softmax_rows(logits: dict[int, float]) -> dict[int, float]:
    top = max(logits.values())
    z = sum(math.exp(v - top) for v in logits.values())
    return {j: math.exp(v - top) / z for j, v in logits.items()}


def _by_hand(q, k, positions, keys_of, scale):
    """[Hq, Tk] mass from explicit per-(head, query) softmaxes over the keys `keys_of(h, i)`."""
    Hq, n, _ = q.shape
    out = torch.zeros(Hq, k.shape[1], dtype=torch.float64)
    group = Hq // k.shape[0]
    for h in range(Hq):
        for i in range(n):
            logits = {j: float(q[h, i].double() @ k[h // group, j].double()) * scale for j in keys_of(h, i)}
            for j, p in _softmax_rows(logits).items():
                out[h, j] += p
    return out.float()


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(capture, "_CHUNK", 5)  # forces many (query, key) tiles on a tiny case


def test_dense_mass_is_the_softmax_over_all_past_keys(small_tiles):
    q, k = torch.randn(4, 3, 8), torch.randn(2, 11, 8)
    positions = torch.tensor([8, 9, 10])
    got = dense_key_mass(q, positions, k, 0.5)
    want = _by_hand(q, k, positions, lambda h, i: range(int(positions[i]) + 1), 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(1), torch.full((4,), 3.0))


def test_moba_mass_is_the_softmax_over_attended_keys_only(small_tiles):
    bs = 4
    q, k = torch.randn(2, 2, 8), torch.randn(1, 14, 8)
    positions = torch.tensor([12, 13])
    blocks = torch.tensor([[[3, 0, -1], [3, 1, 0]], [[3, 2, -1], [3, -1, -1]]])  # [Hq, n, S]

    def keys_of(h, i):
        ids = [int(b) for b in blocks[h, i] if b >= 0]
        return [j for b in ids for j in range(b * bs, (b + 1) * bs) if j <= positions[i]]

    got = head_key_mass(q, positions, k, blocks, bs, 0.3)
    torch.testing.assert_close(got, _by_hand(q, k, positions, keys_of, 0.3), rtol=1e-5, atol=1e-6)
    assert got[1, 4:8].sum() == 0  # head 1 never attended block 1
    torch.testing.assert_close(block_sum(got, bs).sum(1), torch.full((2,), 2.0))


def test_gate_mass_is_the_softmax_over_past_blocks():
    bs = 4
    q, means = torch.randn(2, 2, 8), torch.randn(1, 3, 8)
    positions = torch.tensor([9, 13])  # own blocks 2 and 3: two and three past blocks
    got = gate_block_mass(q, positions, means, bs, 0.5)
    want = torch.zeros(2, 3)
    for h in range(2):
        for i, own in enumerate((2, 3)):
            p = _softmax_rows({b: float(q[h, i] @ means[0, b]) * 0.5 for b in range(own)})
            for b, v in p.items():
                want[h, b] += v
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_layer_records_what_it_computed():
    """Layer 2 is dense: its block mass covers every past block; MoBA layer 0 only attended ones."""
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, sink_blocks=0, dense_layers=[2])
    rec = moba.RoutingRecorder(start=96, per_head=True)
    with torch.inference_mode(), moba.capture_routing(rec):
        m(ids)
    ev = rec.evidence("mass")
    assert ev.shape == (3, 4, 13)
    torch.testing.assert_close(ev.sum(-1), torch.full((3, 4), 4.0))  # 4 queries, each sums to 1
    assert (ev[2, :, :12] > 0).all()  # dense: every block before the own one
    attended = {(h, int(b)) for r in rec.records[0] for h in range(4) for b in r.blocks[h].flatten() if b >= 0}
    unattended = [(h, b) for h in range(4) for b in range(13) if (h, b) not in attended]
    assert unattended and all(ev[0, h, b] == 0 for h, b in unattended)
    gate = rec.evidence("gate")
    assert gate.shape == (3, 4, 12)
    torch.testing.assert_close(gate.sum(-1), torch.full((3, 4), 4.0))


def test_head_weights_weigh_the_key_mass():
    ids = torch.randint(0, 97, (1, 60))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, dense_layers=[0, 1, 2])
    plain, weighted = moba.RoutingRecorder(start=56), moba.RoutingRecorder(start=56, per_head=True)
    weighted.head_weights = torch.zeros(3, 4)
    weighted.head_weights[1, 2] = 1.0
    for rec in (plain, weighted):
        with torch.inference_mode(), moba.capture_routing(rec):
            m(ids)
    torch.testing.assert_close(plain.key_mass.sum(), torch.tensor(3 * 4 * 4.0))
    one_head = weighted.evidence("mass")[1, 2]
    torch.testing.assert_close(block_sum(weighted.key_mass[None], 8)[0], one_head)


def test_capture_off_costs_nothing(monkeypatch):
    """No recorder: no mass is computed. A recorder without per_head: no per-head evidence."""
    def boom(*a, **k):
        raise AssertionError("computed while off")

    ids = torch.randint(0, 97, (1, 60))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, dense_layers=[1])
    for name in ("dense_key_mass", "head_key_mass", "gate_block_mass"):
        monkeypatch.setattr(capture, name, boom)
    monkeypatch.setattr(hf, "_record", boom)
    with torch.inference_mode():
        m(ids)
    monkeypatch.undo()
    monkeypatch.setattr(capture, "gate_block_mass", boom)
    monkeypatch.setattr(capture.RoutingRecorder, "add_head_evidence", boom)
    rec = moba.RoutingRecorder(start=50)
    with torch.inference_mode(), moba.capture_routing(rec):
        m(ids)
    assert rec.records and rec.head_mass == {} and rec.gate_mass == {}
    assert rec.evidence("mass").numel() == 0


def _decode_capture(m, ids, start, tail_start=None):
    """Prefill ids[:start] unrecorded, then feed the rest one token a call with a recorder from `start`."""
    rec = moba.RoutingRecorder(start=start, per_head=True, tail_start=tail_start)
    arg = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
    with torch.inference_mode():
        pkv = m(ids[:, :start], use_cache=True).past_key_values
        with moba.capture_routing(rec):
            for t in range(start, ids.shape[1]):
                pkv = m(ids[:, t : t + 1], use_cache=True, **{arg: pkv}).past_key_values
    return rec


@pytest.mark.parametrize("pending_bytes", [capture.PENDING_BYTES, 1], ids=["at-exit", "every-call"])
def test_mass_is_computed_late_in_one_batch_and_equals_one_forward(monkeypatch, pending_bytes):
    """Token-by-token decode under a recorder computes each layer's mass once, at exit, and gets the
    same key mass and per-head evidence as one forward over every token (MoBA layer 0, dense layer 2);
    flushing after every call (a small PENDING_BYTES) gives the same again."""
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, sink_blocks=1, dense_layers=[2])
    whole = moba.RoutingRecorder(start=92, per_head=True)
    with torch.inference_mode(), moba.capture_routing(whole):
        m(ids)
    calls = []
    for name in ("dense_key_mass", "head_key_mass"):
        real = getattr(capture, name)
        monkeypatch.setattr(capture, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    monkeypatch.setattr(capture, "PENDING_BYTES", pending_bytes)
    rec = _decode_capture(m, ids, 92)
    assert len(calls) == (3 if pending_bytes > 1 else 3 * 8)
    torch.testing.assert_close(rec.key_mass, whole.key_mass, rtol=1e-4, atol=1e-5)
    for signal in capture.SIGNALS:
        torch.testing.assert_close(rec.evidence(signal), whole.evidence(signal), rtol=1e-4, atol=1e-5)
    assert all(r.blocks.device.type == "cpu" for recs in rec.records.values() for r in recs)


def test_tail_mass_is_the_later_queries_own_mass():
    """With tail_start, the key mass of queries from tail_start on is also kept apart: it equals what a
    recorder of those queries alone gets, over a MoBA and a dense layer, and the total is unchanged."""
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, sink_blocks=1, dense_layers=[2])
    split = moba.RoutingRecorder(start=84, tail_start=93, per_head=True)
    whole, tail_only = moba.RoutingRecorder(start=84, per_head=True), moba.RoutingRecorder(start=93, per_head=True)
    for rec in (split, whole, tail_only):
        with torch.inference_mode(), moba.capture_routing(rec):
            m(ids)
    torch.testing.assert_close(split.tail_mass, tail_only.key_mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(split.key_mass, whole.key_mass, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(split.evidence("mass"), whole.evidence("mass"), rtol=1e-4, atol=1e-6)
    assert 0 < split.tail_mass.sum() < split.key_mass.sum()
    assert whole.tail_mass.numel() == 0


@pytest.mark.parametrize("pending_bytes", [capture.PENDING_BYTES, 1], ids=["at-exit", "every-call"])
def test_tail_mass_is_the_same_token_by_token(monkeypatch, pending_bytes):
    """Decoding token by token (each flush all-question, all-answer or mixed) keeps the same tail mass as one
    forward over every token."""
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, sink_blocks=1, dense_layers=[2])
    whole = moba.RoutingRecorder(start=92, tail_start=96, per_head=True)
    with torch.inference_mode(), moba.capture_routing(whole):
        m(ids)
    monkeypatch.setattr(capture, "PENDING_BYTES", pending_bytes)
    rec = _decode_capture(m, ids, 92, tail_start=96)
    assert whole.tail_mass.sum() > 0
    torch.testing.assert_close(rec.tail_mass, whole.tail_mass, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.key_mass, whole.key_mass, rtol=1e-4, atol=1e-5)


def test_head_keys_are_each_heads_question_mass():
    """head_keys keeps every (layer, head)'s own key mass of the queries before tail_start: summed over
    heads it is the question's part of key_mass, one head's block sums are its per-head evidence when no
    tail is kept, and a recorder without it keeps none."""
    ids = torch.randint(0, 97, (1, 100))
    m = tiny_model("llama", "moba", block_size=8, top_k=2, sink_blocks=1, dense_layers=[2])
    split = moba.RoutingRecorder(start=84, tail_start=93, per_head=True, head_keys=True)
    head_only = moba.RoutingRecorder(start=84, end=93, per_head=True, head_keys=True)
    plain = moba.RoutingRecorder(start=84, tail_start=93, per_head=True)
    for rec in (split, head_only, plain):
        with torch.inference_mode(), moba.capture_routing(rec):
            m(ids)
    per_head = split.question_head_mass(3)
    assert per_head.shape == (3, 4, 100)
    question = split.key_mass - torch.nn.functional.pad(split.tail_mass, (0, 100 - split.tail_mass.numel()))
    torch.testing.assert_close(per_head.sum((0, 1)), question, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(head_only.question_head_mass(3), per_head, rtol=1e-4, atol=1e-5)
    ev = head_only.evidence("mass")
    torch.testing.assert_close(block_sum(head_only.question_head_mass(3).flatten(0, 1), 8).view(3, 4, -1)[..., : ev.shape[-1]],
                               ev, rtol=1e-4, atol=1e-5)
    assert plain.head_keys_mass == {} and plain.question_head_mass(3).numel() == 0
