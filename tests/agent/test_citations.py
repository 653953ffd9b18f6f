"""Citations from routing and from answer text, on a fixture source map built by ingest."""

import pytest
import torch

import ingest
from agent.citations import (
    BOTH,
    ROUTING,
    TEXT,
    Citation,
    combine,
    file_strengths,
    from_routing,
    from_text,
    merge,
)
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
    return ingest.pack([root], make_tokenizer(), ingest.PackOptions(cache=False))


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
        ("a.py", 10, 12, BOTH), ("b.py", 1, 1, TEXT), ("a.py", 13, 14, ROUTING)]
