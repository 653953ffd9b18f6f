"""Citations from routing and from answer text, on a fixture source map built by ingest."""

import numpy as np
import pytest
import torch

import ingest
from agent.citations import (
    BOTH,
    ROUTING,
    TEXT,
    Citation,
    candidate_blocks,
    cite_blocks,
    combine,
    file_strengths,
    from_routing,
    from_text,
    merge,
    routed_blocks,
    routing_counts,
)
from agent.routingmap import routing_matrix
from moba.capture import RoutingRecorder
from moba.types import Routing
from tests.ingest.fixtures import make_tokenizer, write_tree

BS = 32


@pytest.fixture(scope="module")
def pk(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("c") / "repo", {
        "README.md": "# Title\n\nSome words about the project.\n",
        "pkg/core.py": "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(30)),
        "pkg/util.py": "import os\n\nVALUE = 42\n" + "".join(f"Z{i} = {i}\n" for i in range(40)),
    })
    return ingest.pack([root], make_tokenizer(), ingest.PackOptions())


def recorder_on(smap, path, line, n_queries=3, start=None):
    """A recorder whose queries route to the block holding path:line and put their mass on that line."""
    lo, hi = smap.line_tokens(path, line)
    total = smap.total
    start = total if start is None else start
    blocks = torch.full((1, 2, n_queries, 3), -1, dtype=torch.long)
    blocks[..., 0] = start // BS
    blocks[..., 1] = lo // BS
    blocks[..., 2] = 0  # the sink
    rec = RoutingRecorder(start=start)
    rec.record(0, start, Routing(blocks, torch.where(blocks >= 0, 1.0, float("-inf"))), dense=False)
    mass = torch.full((start + n_queries,), 0.01)
    mass[:BS] = 5.0  # attention-sink mass must not be cited
    mass[lo:hi] += 3.0
    rec.add_key_mass(mass)
    return rec


def test_routing_citation_narrows_to_the_heavy_line(pk):
    rec = recorder_on(pk.source_map, "pkg/util.py", 3)
    cites = from_routing(rec, pk.source_map, block_size=BS, sink_blocks=1)
    assert cites[0].path == "pkg/util.py" and cites[0].start_line <= 3 <= cites[0].end_line
    assert cites[0].end_line - cites[0].start_line <= 4 and cites[0].source == ROUTING
    assert all(c.path != "README.md" for c in cites)  # block 0 is a sink
    assert abs(sum(c.score for c in cites) - 1.0) < 1e-6 or len(cites) == 8
    assert all(pk.source_map.has(c.path, c.start_line) and pk.source_map.has(c.path, c.end_line) for c in cites)


def test_routing_without_mass_cites_whole_routed_blocks(pk):
    rec = recorder_on(pk.source_map, "pkg/core.py", 40)
    rec.key_mass = torch.zeros(0)
    cites = from_routing(rec, pk.source_map, block_size=BS, sink_blocks=1)
    lo, _ = pk.source_map.line_tokens("pkg/core.py", 40)
    spans = pk.source_map.span_lines((lo // BS) * BS, (lo // BS + 1) * BS)
    assert {(c.path, c.start_line, c.end_line) for c in cites} == set(spans)


def test_file_strengths_rank_the_routed_file_first(pk):
    strengths = file_strengths(recorder_on(pk.source_map, "pkg/core.py", 21), pk.source_map, block_size=BS,
                               sink_blocks=1)
    assert next(iter(strengths)) == "pkg/core.py" and abs(sum(strengths.values()) - 1) < 1e-6


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("see pkg/util.py:3", {("pkg/util.py", 3, 3)}),
        ("in util.py:3-5 and core.py#L4", {("pkg/util.py", 3, 5), ("pkg/core.py", 4, 4)}),
        ("pkg/util.py#L7-L9 and ./pkg/util.py:7-9", {("pkg/util.py", 7, 9)}),
        ("bogus: pkg/nope.py:1, pkg/util.py:999, pkg/util.py:9-2, README.md:0", set()),
        ("`pkg/core.py:10`, then (pkg/core.py:11).", {("pkg/core.py", 10, 11)}),
    ],
)
def test_text_citations_resolve_or_are_dropped(pk, answer, expected):
    got = {(c.path, c.start_line, c.end_line) for c in from_text(answer, pk.source_map)}
    assert got == expected


def test_merge_and_combine_mark_both_sources():
    r = [Citation("a.py", 10, 12, 0.6, ROUTING), Citation("a.py", 13, 14, 0.2, ROUTING)]
    t = [Citation("a.py", 12, 12, 0.0, TEXT), Citation("b.py", 1, 1, 0.0, TEXT)]
    assert merge(r) == [Citation("a.py", 10, 14, pytest.approx(0.8), ROUTING)]
    both = combine(r, t)
    assert [(c.path, c.start_line, c.end_line, c.source) for c in both] == [
        ("a.py", 10, 12, BOTH), ("a.py", 13, 14, ROUTING), ("b.py", 1, 1, TEXT)]


def test_combine_ranks_by_routing_strength_and_text_only_last():
    r = [Citation("a.py", 1, 2, 0.1, ROUTING), Citation("c.py", 5, 6, 0.7, ROUTING)]
    t = [Citation("b.py", 3, 3, 0.0, TEXT), Citation("a.py", 2, 2, 0.0, TEXT)]
    got = [(c.path, c.source) for c in combine(r, t)]
    assert got == [("c.py", ROUTING), ("a.py", BOTH), ("b.py", TEXT)]


def evidence_recorder(smap, heads_to, noise_to, sink=0):
    """A per-head recorder over 2 layers x 3 heads: head (1, 2) puts its mass on block `heads_to`,
    every other head on block `noise_to`, and all heads put a lot on block `sink` and on the
    question's own block (after the pack). The key mass marks the first line of `heads_to`."""
    nb = smap.total // BS + 2
    rec = RoutingRecorder(start=smap.total, per_head=True)
    for layer in (0, 1):
        mass = torch.full((3, nb), 0.01)
        mass[:, sink] = mass[:, -1] = 10.0  # sink and question blocks: never citable
        for h in range(3):
            mass[h, heads_to if (layer, h) == (1, 2) else noise_to] += 1.0
        rec.add_head_evidence(layer, mass, mass.clone())
    key = torch.full((nb * BS,), 0.01)
    lo = heads_to * BS
    key[lo: lo + 3] = 2.0
    rec.add_key_mass(key)
    return rec


def _w(layer=1, head=2):
    w = torch.zeros(2, 3)
    w[layer, head] = 1.0
    return w


def test_weighted_ranking_follows_the_retrieval_head(pk):
    smap = pk.source_map
    gold, noise = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    sink = smap.line_tokens("README.md", 3)[0] // BS
    rec = evidence_recorder(smap, gold, noise, sink)
    weighted = from_routing(rec, smap, block_size=BS, sink_blocks=sink + 1, weights=_w())
    uniform = from_routing(rec, smap, block_size=BS, sink_blocks=sink + 1)
    in_sinks = {(p, ln) for p, a, b in smap.span_lines(0, (sink + 1) * BS) for ln in range(a, b + 1)}
    top_block = {b for b in range(gold * BS, gold * BS + 3) if smap.locate(b)}
    assert weighted[0].path == smap.locate(min(top_block))[0] == "pkg/util.py"
    assert weighted[0].start_line <= smap.locate(min(top_block))[1] <= weighted[0].end_line
    assert uniform[0].path == "pkg/core.py"  # five noise heads outvote the one retrieval head
    for cites in (weighted, uniform):
        assert not any((c.path, ln) in in_sinks for c in cites for ln in range(c.start_line, c.end_line + 1))
        assert all(smap.has(c.path, c.start_line) and smap.has(c.path, c.end_line) for c in cites)
        assert 0 < sum(c.score for c in cites) <= 1 + 1e-6  # shares of the cited blocks, weak ranges dropped


def test_only_whole_source_blocks_before_the_question_are_citable(pk):
    smap = pk.source_map
    last = (smap.total - 1) // BS  # holds the pack's last lines and the start of the question
    assert smap.total % BS and smap.span_lines(last * BS, smap.total)
    cand = candidate_blocks(smap, last + 3, BS, 1)
    assert not cand[0] and not cand[last:].any() and cand[1:last].any()
    assert all(cand[b] == bool(smap.span_lines(b * BS, (b + 1) * BS)) for b in range(1, last))
    rec = evidence_recorder(smap, last, last, sink=0)
    for m in rec.head_mass.values():
        m[:, 1:last] = 0.0  # every head's evidence is on the sink, the straddling block and the question
    assert from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w()) == []


def test_gate_signal_is_read_when_the_weights_say_so(pk):
    smap = pk.source_map
    gold, other = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    rec = evidence_recorder(smap, gold, gold)
    rec.gate_mass = {layer: torch.zeros_like(m) for layer, m in rec.head_mass.items()}
    rec.gate_mass[1][2, other] = 1.0  # the gate of head (1, 2) points elsewhere
    by_gate = from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w(), signal="gate")
    by_mass = from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w(), signal="mass")
    assert by_gate[0].path == "pkg/core.py" and by_mass[0].path == "pkg/util.py"


def test_routing_counts_leave_out_forced_blocks_as_routed_blocks_does(pk):
    lo, _ = pk.source_map.line_tokens("pkg/core.py", 40)
    start, n = pk.source_map.total, 3
    blocks = torch.full((1, 2, n, 4), -1, dtype=torch.long)
    blocks[..., 0], blocks[..., 1], blocks[..., 2], blocks[..., 3] = start // BS, start // BS - 1, lo // BS, 0
    scores = torch.ones(blocks.shape)
    scores[..., :2] = float("inf")  # the own block and a local block: attended by rule, not routed
    rec = RoutingRecorder(start=start)
    rec.record(0, start, Routing(blocks, scores), dense=False)
    counts = routing_counts(rec, pk.source_map, block_size=BS, sink_blocks=1)
    assert counts.per_layer == {0: {lo // BS: 2 * n}} == {0: routed_blocks(rec, 1)}
    mat, layers, labels, ids = routing_matrix(counts)
    assert ids == [lo // BS] and layers == [0] and mat.tolist() == [[2 * n]]
    assert labels[0].startswith("pkg/core.py:")


def _block_with_lines(smap, path, lines, heavy, bs=BS):
    """Scores that pick the block of path:lines[0], and key mass `heavy[i]` on each of `lines`."""
    lo = smap.line_tokens(path, lines[0])[0]
    scores = np.zeros(smap.total // bs + 1)
    scores[lo // bs] = 1.0
    mass = np.full(smap.total, 0.01)
    for ln, m in zip(lines, heavy):
        a, b = smap.line_tokens(path, ln)
        mass[a:b] += m
    return scores, mass


def test_keep_share_drops_weak_ranges_by_default(pk):
    smap = pk.source_map
    scores, mass = _block_with_lines(smap, "pkg/util.py", [20], heavy=[4.0])
    other = smap.line_tokens("pkg/core.py", 40)[0]
    scores[other // BS] = 0.05
    mass[other: other + 2] += 4.0
    both = cite_blocks(scores, mass, smap, block_size=BS, keep_share=0.0)
    strongest = cite_blocks(scores, mass, smap, block_size=BS)
    assert [c.path for c in both] == ["pkg/util.py", "pkg/core.py"]
    assert [c.path for c in strongest] == ["pkg/util.py"] and strongest[0] == both[0]


def test_lines_come_from_the_question_tokens_mass_not_the_answers(pk):
    """The answer tokens' own mass (the recorder's tail) is left out when a cited block is narrowed to lines:
    an answer piling mass on another line of the same block does not move the citation there."""
    smap = pk.source_map
    gold, noise = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    rec = evidence_recorder(smap, gold, noise)
    question_line = smap.locate(gold * BS)[1]
    elsewhere = next(t for t in range(gold * BS + 3, (gold + 1) * BS) if smap.locate(t)[1] > question_line + 2)
    rec.tail_mass = torch.zeros_like(rec.key_mass)
    rec.tail_mass[elsewhere] = 50.0
    rec.key_mass += rec.tail_mass
    (top, *_) = from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w())
    assert top.path == "pkg/util.py" and top.start_line <= question_line <= top.end_line
    cited = {ln for c in from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w()) if c.path == top.path
             for ln in range(c.start_line, c.end_line + 1)}
    assert smap.locate(elsewhere)[1] not in cited


def test_a_block_whose_mass_peaks_outranks_one_that_spreads_it(pk):
    """With one line a block, a line scores its block's share times its part of ALL the block's stand-out
    mass: a block of equal share that spreads its mass over many lines ranks below one that peaks."""
    smap = pk.source_map
    peak, spread = smap.line_tokens("pkg/util.py", 20)[0], smap.line_tokens("pkg/core.py", 40)[0]
    scores = np.zeros(smap.total // BS + 1)
    scores[peak // BS] = scores[spread // BS] = 1.0
    mass = np.full(smap.total, 0.01)
    mass[slice(*smap.line_tokens("pkg/util.py", 20))] += 4.0
    core = smap.paths.index("pkg/core.py")
    lines = {ln for f, ln in map(smap.locate, range(spread // BS * BS, (spread // BS + 1) * BS)) if f == core and ln}
    for ln in lines:
        mass[slice(*smap.line_tokens("pkg/core.py", ln))] += 4.0 + 0.1 * ln
    cites = cite_blocks(scores, mass, smap, block_size=BS, max_lines=1, keep_share=0.0)
    assert [(c.path, c.start_line, c.end_line) for c in cites][0] == ("pkg/util.py", 20, 20)
    assert len(cites) == 2 and cites[1].path == "pkg/core.py" and cites[1].start_line == cites[1].end_line
    assert cites[1].score < 0.9 * cites[0].score  # scored by its whole block's share, the two would tie
    whole = cite_blocks(scores, mass, smap, block_size=BS, keep_share=0.0)
    assert sum(c.score for c in whole) == pytest.approx(1.0)


def test_a_block_with_no_stand_out_line_is_cited_whole_and_weighed_as_even(pk):
    """A block where the key mass is flat (e.g. heads that put nothing there) is cited whole, scored as if its
    mass were even over its lines: below a block of the same share whose mass peaks on one line."""
    smap = pk.source_map
    peak, flat = smap.line_tokens("pkg/util.py", 20)[0], smap.line_tokens("pkg/core.py", 40)[0]
    scores = np.zeros(smap.total // BS + 1)
    scores[peak // BS] = scores[flat // BS] = 1.0
    mass = np.zeros(smap.total)
    mass[slice(*smap.line_tokens("pkg/util.py", 20))] = 4.0
    one = cite_blocks(scores, mass, smap, block_size=BS, max_lines=1, keep_share=0.0)
    assert (one[0].path, one[0].start_line, one[0].end_line) == ("pkg/util.py", 20, 20)
    whole = [c for c in one if c.path == "pkg/core.py"]
    assert len(whole) == 1 and whole[0].end_line > whole[0].start_line and whole[0].score < one[0].score / 2
    wide = cite_blocks(scores, mass, smap, block_size=BS, keep_share=0.0)
    assert [c.score for c in wide if c.path == "pkg/core.py"] == [0.5]  # every line fits in 24: its whole share
