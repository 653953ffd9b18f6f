"""Citations into a file packed as an outline resolve to the real file:line it shows."""

import pytest

import ingest
from agent.citations import ROUTING, TEXT, from_routing, from_text
from tests.agent.test_citations import BS, recorder_on
from tests.ingest.fixtures import make_tokenizer, write_tree

CORE = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(30))  # def f{i} on line 3i + 1


@pytest.fixture(scope="module")
def pk(tmp_path_factory):
    root = write_tree(tmp_path_factory.mktemp("o") / "repo", {
        "README.md": "# Title\n\nSome words about the project.\n",
        "pkg/core.py": CORE,
        "pkg/util.py": "import os\n\nVALUE = 42\n",
    })
    tok = make_tokenizer()
    full = ingest.pack([root], tok, ingest.PackOptions())
    p = ingest.pack([root], tok, ingest.PackOptions(max_tokens=full.total_tokens * 2 // 3))
    assert [o[0] for o in p.outlined] == ["pkg/core.py"] and not p.dropped
    return p


def test_text_citation_of_a_shown_line_resolves_and_a_hidden_line_does_not(pk):
    assert from_text("see pkg/core.py:40", pk.source_map) == [from_text("core.py:40", pk.source_map)[0]]
    cite = from_text("see pkg/core.py:40", pk.source_map)[0]
    assert (cite.path, cite.start_line, cite.end_line, cite.source) == ("pkg/core.py", 40, 40, TEXT)
    assert CORE.split("\n")[39] == "def f13(x):"
    assert from_text("pkg/core.py:41", pk.source_map) == []  # a body line the model never saw


def test_routing_citation_into_an_outline_names_the_real_line(pk):
    rec = recorder_on(pk.source_map, "pkg/core.py", 58)
    cites = from_routing(rec, pk.source_map, block_size=BS, sink_blocks=1)
    best = cites[0]
    assert best.path == "pkg/core.py" and best.source == ROUTING
    assert best.start_line <= 58 <= best.end_line and best.start_line % 3 == 1 and best.end_line % 3 == 1
    lo, hi = pk.source_map.line_tokens("pkg/core.py", 58)
    assert make_tokenizer().decode(pk.ids[lo:hi].tolist()).strip() == "58| def f19(x):"
