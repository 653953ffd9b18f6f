"""Round trip: every token of every file maps back to the line it came from; SourceMap queries."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

import ingest
from tests.ingest.fixtures import SPECIAL, git_repo, write_tree

FILES = {
    "README.md": "# Demo\n\nSome words about the project.\n",
    "src/app.py": "import os\n\n\nclass Config:\n    def load(self, path):\n        with open(path) as f:\n"
                  "            return f.read()\n\n\n\ndef main(argv):\n\tparser = build_parser()  \n"
                  "    return parser.parse_args(argv)\n",
    "src/unicode.py": "name = 'café 中文 🚀'\n# naïve — dash\nemoji = '👍🏽'\n",
    "src/special.txt": f"before {SPECIAL} after\n{SPECIAL}\n",
    "src/no_newline.py": "x = 1\ny = 2",
    "src/empty.py": "",
    "src/long.py": "".join(f"value_{i} = {i} * {i}  # {'x' * (i % 7)}\n" for i in range(1, 120)),
}


@pytest.fixture(params=[True, False], ids=["numbered", "plain"])
def packed(request, tmp_path, run_pack):
    write_tree(tmp_path, FILES)
    git_repo(tmp_path, commit=list(FILES))
    return run_pack(tmp_path, line_numbers=request.param)


def section_text(p: ingest.Pack, path: str) -> str:
    start = p.text.index(f'<file path="{path}"')
    return p.text[start:p.text.index("</file>\n\n", start) + len("</file>\n\n")]


def reference(tok: Tokenizer) -> Tokenizer:
    ref = Tokenizer.from_str(tok.to_str())
    ref.encode_special_tokens = True
    return ref


def test_every_token_maps_to_its_line_via_offsets(packed, tok):
    ref, sm = reference(tok), packed.source_map
    for f in packed.files:
        text = section_text(packed, f.path)
        enc = ref.encode(text, add_special_tokens=False)
        assert enc.ids == packed.ids[f.token_start:f.token_end].tolist(), f.path
        lines = text.split("\n")
        for i, (s, e) in enumerate(enc.offsets):
            k = text.count("\n", 0, s)
            expected = k if 1 <= k <= f.lines else 0
            assert sm.locate(f.token_start + i) == (f.path, expected), (f.path, i, text[s:e])
            if expected:
                assert text[s:e].split("\n")[0] in lines[k]


def test_every_token_maps_to_its_line_via_decoding(packed, tok):
    """Independent of offsets: decode tokens one by one (ASCII files) and track the character position."""
    sm, crossing = packed.source_map, 0
    for f in packed.files:
        text = section_text(packed, f.path)
        if not text.isascii() or SPECIAL in text:
            continue
        pos = 0
        for t in range(f.token_start, f.token_end):
            piece = tok.decode([int(packed.ids[t])])
            assert text[pos:pos + len(piece)] == piece
            k = text.count("\n", 0, pos)
            assert sm.locate(t) == (f.path, k if 1 <= k <= f.lines else 0)
            crossing += "\n" in piece[:-1] and 1 <= k <= f.lines
            pos += len(piece)
        assert pos == len(text)
    assert crossing > 0, "no token spans a line break: the fixture does not exercise that case"


def test_ids_are_the_text_and_tree_maps_to_none(packed, tok):
    assert tok.decode(packed.ids.tolist()) == packed.text
    sm = packed.source_map
    assert all(sm.locate(t) is None for t in range(packed.tree_tokens))
    assert packed.files[0].token_start == packed.tree_tokens and packed.files[-1].token_end == packed.total_tokens
    assert sm.locate(packed.total_tokens) is None and sm.locate(-1) is None
    assert int(tok.token_to_id(SPECIAL)) not in packed.ids.tolist()


def test_line_ranges_tile_each_file(packed):
    sm = packed.source_map
    for f in packed.files:
        assert sm.file_tokens(f.path) == (f.token_start, f.token_end)
        bounds = [sm.line_tokens(f.path, k) for k in range(1, f.lines + 1)]
        for (_, end), (start, _) in zip(bounds, bounds[1:]):
            assert end == start
        for k, (a, b) in enumerate(bounds, 1):
            assert all(sm.locate(t) == (f.path, k) for t in range(a, b))
        if bounds:
            assert f.token_start < bounds[0][0] and bounds[-1][1] < f.token_end


def test_span_lines_has_and_memory(packed):
    sm = packed.source_map
    long = next(f for f in packed.files if f.path == "src/long.py")
    a, b = sm.line_tokens("src/long.py", 30)[0], sm.line_tokens("src/long.py", 40)[1]
    assert sm.span_lines(a, b) == [("src/long.py", 30, 40)]
    assert sm.span_lines(a, a) == [] and sm.span_lines(0, packed.tree_tokens) == []
    nxt = packed.files[[f.path for f in packed.files].index("src/long.py") + 1]
    spans = sm.span_lines(long.token_end - 20, nxt.token_start + sm.line_tokens(nxt.path, 1)[1] - nxt.token_start)
    assert [s[0] for s in spans] == ["src/long.py", nxt.path] and spans[0][2] == 119 and spans[1][1:] == (1, 1)
    assert sm.has("src/long.py", 1) and sm.has("src/long.py", 119)
    assert not sm.has("src/long.py", 0) and not sm.has("src/long.py", 120) and not sm.has("nope.py", 1)
    assert not sm.has("src/empty.py", 1)
    with pytest.raises(KeyError):
        sm.line_tokens("src/long.py", 120)
    assert len(sm.starts) == 2 + sum(f.lines + 2 for f in packed.files)


def test_shifted(packed):
    sm, k = packed.source_map, 37
    moved = sm.shifted(k)
    probe = np.arange(0, packed.total_tokens, 7)
    assert [moved.locate(int(t) + k) for t in probe] == [sm.locate(int(t)) for t in probe]
    assert all(moved.locate(t) is None for t in range(k))
    assert moved.locate(packed.total_tokens + k) is None
    f = packed.files[1]
    assert moved.line_tokens(f.path, 1) == tuple(x + k for x in sm.line_tokens(f.path, 1))
    fidx, lines = moved.locate_array(probe + k)
    assert [(moved.paths[i], int(n)) if i >= 0 else None for i, n in zip(fidx, lines)] == \
        [sm.locate(int(t)) for t in probe]


def test_transformers_fast_tokenizer_gives_the_same_pack(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    write_tree(tmp_path, FILES)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    a = ingest.pack(tmp_path, tok)
    b = ingest.pack(tmp_path, hf)
    assert (a.ids == b.ids).all() and a.text == b.text and a.files == b.files
    with pytest.raises(TypeError, match="fast tokenizer"):
        ingest.pack(tmp_path, object())


def test_span_lines_over_the_whole_pack(packed):
    spans = packed.source_map.span_lines(0, packed.total_tokens)
    expected = [(f.path, 1, f.lines) for f in packed.files if f.lines]
    assert spans == expected
