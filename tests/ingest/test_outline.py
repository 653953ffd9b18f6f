"""Outlines: which lines each parser keeps, with exact line numbers; files without a parser say why."""

from __future__ import annotations

import pytest

from ingest.outline import NoOutline, outline

PY = '''"""Module doc."""
import os

MAX_ITEMS = 3
helper_value = 4


@register(
    name="a")
class Config(Base):
    """Settings."""

    name: str = "x"
    LIMIT = 5

    def load(self,
             path: str,
             ) -> dict:
        # reads the file
        return {}

    async def fetch(self): return 1


def main(argv):
    """
    Entry point.
    """
    def inner():
        pass
    return inner


if os.name == "nt":
    def windows_only():
        pass
'''
# line number -> why it is in the outline
PY_EXPECTED = {4: "constant", 8: "decorator", 9: "decorator, 2nd line", 10: "class", 11: "docstring",
               13: "class field", 14: "class constant", 16: "def", 17: "signature", 18: "signature end",
               22: "async def", 25: "def", 26: "docstring opening", 27: "docstring text", 35: "def under if"}


def shown(rel: str, text: str) -> dict[int, str]:
    lines = text.split("\n")
    return {k: lines[k - 1] for k in outline(rel, text).lines}


def test_python_outline_lines_are_exact():
    got = outline("pkg/config.py", PY)
    assert got.how == "python ast"
    assert list(got.lines) == sorted(PY_EXPECTED), shown("pkg/config.py", PY)


def test_python_syntax_error_falls_back_to_a_line_scan():
    text = "import os\n\n@cache\ndef good(x):\n    return x\n\nclass Broken(:\n    def method(self):\n        pass\n"
    got = outline("bad.py", text)
    assert got.lines == (3, 4, 7, 8) and got.how == "line scan (syntax error at line 7)"


def test_python_nesting_too_deep_for_ast_is_scanned_not_raised():
    text = "def f():\n    return " + "(" * 5000 + ")" * 5000 + "\n"
    got = outline("deep.py", text)
    assert got.lines == (1,) and got.how.startswith("line scan")


SOURCES = {
    "web/app.js": ("import x from 'y';\nexport class App extends Base {\n  constructor(a) { this.a = a; }\n"
                   "  render(props,\n         state) {\n    return null;\n  }\n}\nexport function start(el) {\n"
                   "  function inner() {}\n}\nconst handler = (event) => {\n  return event;\n};\nconst n = 3;\n",
                   [2, 3, 4, 5, 9, 12]),
    "web/types.ts": ("interface Props {\n  name: string;\n  render(): void;\n}\ntype Id = string;\n"
                     "export abstract class Store<T> {\n  get(id: Id): T {\n    return this.items[id];\n  }\n}\n",
                     [1, 3, 5, 6, 7]),
    "srv/main.go": ("package main\n\ntype Server struct {\n\taddr string\n}\n\nfunc (s *Server) Run(a int,\n"
                    "\tb int) error {\n\treturn nil\n}\n\nfunc main() {\n}\n",
                    [3, 7, 8, 12]),
    "core/lib.rs": ("pub trait Shape {\n    fn area(&self) -> f64;\n}\n\nimpl Shape for Circle {\n"
                    "    fn area(&self) -> f64 {\n        3.14\n    }\n}\n\npub struct Circle {\n    r: f64,\n}\n",
                    [1, 2, 5, 6, 11]),
    "src/Main.java": ("package a;\n\npublic class Main {\n    @Override\n    public String toString() {\n"
                      "        return \"\";\n    }\n\n    Main(int x) {\n    }\n}\n",
                      [3, 4, 5, 9]),
    "native/buf.c": ("#include <stdio.h>\n\nstruct buf {\n    int n;\n};\n\nstatic int grow(struct buf *b,\n"
                     "                int by)\n{\n    return 0;\n}\n",
                     [3, 7, 8, 9]),
    "native/vec.cpp": ("namespace geo {\nclass Vec {\n public:\n  double norm() const {\n    return 0;\n  }\n};\n}\n",
                       [1, 2, 4]),
    "lib/tool.rb": ("module Tools\n  class Runner < Base\n    def run(args)\n      args\n    end\n\n"
                    "    def self.build; end\n  end\nend\n",
                    [1, 2, 3, 7]),
}


@pytest.mark.parametrize("rel", list(SOURCES))
def test_tree_sitter_outlines_show_definitions_up_to_their_body(rel):
    text, expected = SOURCES[rel]
    got = outline(rel, text)
    assert got.how.startswith("tree-sitter ")
    assert list(got.lines) == expected, shown(rel, text)


def test_markdown_outline_is_its_headings_outside_code_fences():
    text = "# Title\n\ntext\n```sh\n# a comment, not a heading\n```\n## Usage\n#hashtag\n   ### Deep\n"
    assert outline("docs/guide.md", text).lines == (1, 7, 9)


def test_a_missing_grammar_means_no_outline_with_the_reason(monkeypatch):
    import ingest.outline as mod

    monkeypatch.setattr(mod, "tree_sitter", None)
    mod._parser.cache_clear()
    try:
        with pytest.raises(NoOutline, match=r"no outline parser for \.go files \(the tree-sitter go grammar is not"):
            outline("srv/main.go", SOURCES["srv/main.go"][0])
    finally:
        mod._parser.cache_clear()


@pytest.mark.parametrize(("rel", "text", "why"), [
    ("LICENSE", "MIT License\n", "no outline parser for this file type"),
    ("data/rows.json", '{"a": 1}\n', "no outline parser for .json files"),
    ("notes.txt", "words\n", "no outline parser for .txt files"),
    ("script.py", "print('hi')\nx = 1\n", "no definitions to outline"),
])
def test_files_without_an_outline_say_why(rel, text, why):
    with pytest.raises(NoOutline, match=why):
        outline(rel, text)


REPO = {
    "README.md": "# Demo\n\nA demo.\n",
    "pkg/config.py": PY,
    "pkg/core.py": "import config\n\n" + "".join(f"def step_{i}(x):\n    return x + {i}\n\n" for i in range(30)),
    "web/app.js": SOURCES["web/app.js"][0] * 3,
    "bad.py": "import os\n\ndef ok(a):\n    return a\n\nclass Broken(:\n    pass\n" + "x = 1\n" * 40,
    "notes.txt": "plain words here\n" * 30,
}


@pytest.fixture(params=[True, False], ids=["numbered", "plain"])
def outlined(request, tmp_path, run_pack):
    """A pack at half its size: outlines carry real line numbers with or without --no-line-numbers."""
    from tests.ingest.fixtures import write_tree

    write_tree(tmp_path, REPO)
    full = run_pack(tmp_path, line_numbers=request.param)
    limit = full.total_tokens // 2
    p = run_pack(tmp_path, max_tokens=limit, line_numbers=request.param)
    assert p.total_tokens <= limit and p.outlined
    return p


def test_outline_tokens_map_to_the_real_lines_they_show(outlined, tok):
    from tests.ingest.test_sourcemap import reference, section_text

    p, ref, sm = outlined, reference(tok), outlined.source_map
    for path, n, _, _ in p.outlined:
        f = next(f for f in p.files if f.path == path)
        real = REPO[path].split("\n")
        text = section_text(p, path)
        enc = ref.encode(text, add_special_tokens=False)
        assert enc.ids == p.ids[f.token_start:f.token_end].tolist() and len(enc.ids) == n == f.tokens
        rendered = text.split("\n")
        assert rendered[0].endswith(f'lines="{len(real) - (real[-1] == "")}" outline="signatures only">')
        for i, (s, _) in enumerate(enc.offsets):
            k = text.count("\n", 0, s)
            if 1 <= k < len(rendered) - 3:  # a shown line: "  12| text"
                number, _, body = rendered[k].partition("|")
                assert sm.locate(f.token_start + i) == (path, int(number)), (path, i)
                assert body.removeprefix(" ") == real[int(number) - 1]
            else:
                assert sm.locate(f.token_start + i) == (path, 0)
        shown = [int(line.partition("|")[0]) for line in rendered[1:-3]]
        assert shown == sorted(shown) and len(shown) < len(real) - 1
        for line in shown:
            a, b = sm.line_tokens(path, line)
            assert ref.decode(p.ids[a:b].tolist()).startswith(rendered[1 + shown.index(line)][:8])
            assert sm.has(path, line)
        hidden = next(k for k in range(1, len(real)) if k not in shown)
        assert not sm.has(path, hidden)
        with pytest.raises(KeyError):
            sm.line_tokens(path, hidden)
        assert sm.span_lines(f.token_start, f.token_end) == [(path, shown[0], shown[-1])]
        assert sm.file_tokens(path) == (f.token_start, f.token_end)


def test_report_lists_every_outlined_and_dropped_file_once(outlined):
    p = outlined
    kept = {f.path for f in p.files}
    assert kept | {d[0] for d in p.dropped} == set(REPO) and not kept & {d[0] for d in p.dropped}
    assert {o[0] for o in p.outlined} == {f.path for f in p.files if "outline" in f.flags}
    for path, _, _, _ in p.outlined:
        assert f"{path.rsplit('/', 1)[-1]} (outline)\n" in p.text


def test_syntax_error_file_is_outlined_by_line_scan_and_says_so(tmp_path, run_pack):
    from tests.ingest.fixtures import write_tree

    write_tree(tmp_path, {"bad.py": REPO["bad.py"], "notes.txt": REPO["notes.txt"]})
    full = run_pack(tmp_path)
    p = run_pack(tmp_path, max_tokens=full.total_tokens - 30)
    reasons = {path: reason for path, _, _, reason in p.outlined}
    assert reasons == {"bad.py": "over budget: least central (0 files mention 'bad'); "
                                 "outline by line scan (syntax error at line 6)"}
    assert '<file path="bad.py" lines="47" outline="signatures only">\n 3| def ok(a):\n 6| class Broken(:\n</file>' in p.text
