"""Documents (notebook, PDF), rendering, order, determinism, and that nothing is written in the tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import ingest
from ingest import render
from tests.ingest.fixtures import git_repo, minimal_pdf, snapshot, write_tree

NOTEBOOK = {
    "cells": [
        {"cell_type": "markdown", "source": ["# Analysis\n", "Load the data."], "metadata": {}},
        {"cell_type": "code", "source": "import pandas as pd\ndf = pd.read_csv('x.csv')", "metadata": {},
         "outputs": [{"output_type": "stream", "name": "stdout", "text": ["OUTPUT-TEXT-42\n"]}],
         "execution_count": 1},
    ],
    "metadata": {}, "nbformat": 4, "nbformat_minor": 5,
}


def section(p: ingest.Pack, path: str) -> str:
    start = p.text.index(f'<file path="{path}"')
    return p.text[start:p.text.index("</file>", start)]


def test_notebook_cells_without_outputs(tmp_path, run_pack):
    write_tree(tmp_path, {"nb.ipynb": json.dumps(NOTEBOOK), "bad.ipynb": "{not json"})
    p = run_pack(tmp_path)
    body = section(p, "nb.ipynb")
    assert "# %% [markdown]" in body and "Load the data." in body
    assert "df = pd.read_csv('x.csv')" in body and "OUTPUT-TEXT-42" not in body
    assert next(f for f in p.files if f.path == "nb.ipynb").flags == ("notebook",)
    assert dict(p.skipped)["bad.ipynb"] == "invalid notebook JSON"
    assert "OUTPUT-TEXT-42" in section(run_pack(tmp_path, notebook_outputs=True), "nb.ipynb")


def test_pdf_pages(tmp_path, run_pack):
    pdf = minimal_pdf([["Hello from page one", "second line"], ["Page two text"]])
    write_tree(tmp_path, {"paper.pdf": pdf, "broken.pdf": b"%PDF-1.4 garbage"})
    p = run_pack(tmp_path)
    body = section(p, "paper.pdf")
    assert "--- page 1 ---" in body and "--- page 2 ---" in body
    assert body.index("Hello from page one") < body.index("--- page 2 ---") < body.index("Page two text")
    assert next(f for f in p.files if f.path == "paper.pdf").flags == ("pdf",)
    assert dict(p.skipped)["broken.pdf"].startswith("unreadable PDF")


def test_layout_line_numbers_and_crlf(tmp_path, run_pack):
    lines = [f"line {i}" for i in range(1, 11)]
    write_tree(tmp_path, {"a.py": "\r\n".join(lines) + "\r\n", "empty.py": ""})
    p = run_pack(tmp_path)
    body = section(p, "a.py")
    assert body.startswith('<file path="a.py" lines="10">\n 1| line 1\n 2| line 2\n')
    assert "10| line 10\n" in body and "\r" not in p.text
    assert '<file path="empty.py" lines="0">\n</file>' in p.text
    plain = run_pack(tmp_path, line_numbers=False)
    assert section(plain, "a.py") == '<file path="a.py" lines="10">\n' + "".join(x + "\n" for x in lines)
    assert p.text.startswith("Packed repository ") and "<tree>\na.py\nempty.py\n</tree>\n" in p.text


def test_order_readmes_docs_then_source_by_directory(tmp_path, run_pack):
    files = ["src/zeta.py", "src/Alpha.py", "src/sub/b.py", "main.py", "docs/guide.md", "CHANGES.rst",
             "src/README.md", "README.md", "tests/test_main.py", "docs/api/ref.txt", "Zed.py"]
    write_tree(tmp_path, {f: f"# {f}\n" for f in files})
    order = [f.path for f in run_pack(tmp_path).files]
    assert order == ["README.md", "src/README.md", "CHANGES.rst", "docs/guide.md", "docs/api/ref.txt",
                     "main.py", "Zed.py", "src/Alpha.py", "src/zeta.py", "src/sub/b.py", "tests/test_main.py"]
    assert order == sorted(order, key=render.order_key)


def test_large_tree_collapses_to_directories(tmp_path, run_pack):
    files = {f"pkg{d}/sub/m{i}.py": f"v = {i}\n" for d in range(30) for i in range(10)}
    write_tree(tmp_path, files)
    p = run_pack(tmp_path)
    tree = p.text[p.text.index("<tree>"):p.text.index("</tree>")]
    assert len(p.files) == 300 and "pkg7/ (0 files)" in tree and "  sub/ (10 files)" in tree
    assert len(tree.splitlines()) <= render.TREE_MAX_ENTRIES + 1


def test_deterministic_and_cache_independent(tmp_path, run_pack):
    write_tree(tmp_path, {"README.md": "# R\n", "a/b.py": "def f():\n    return 1\n", "c.txt": "words\n"})
    git_repo(tmp_path, commit=["README.md"])
    first, second, nocache = run_pack(tmp_path), run_pack(tmp_path), run_pack(tmp_path, token_cache=None)
    for other in (second, nocache):
        assert other.text == first.text and other.content_hash == first.content_hash
        assert (other.ids == first.ids).all() and other.files == first.files


def test_nothing_written_inside_the_tree(tmp_path, run_pack):
    root = write_tree(tmp_path / "repo", {"a.py": "x = 1\n", "docs/n.md": "# n\n"})
    git_repo(root, commit=["a.py"])
    before = snapshot(root)
    run_pack(root)
    run_pack(root, token_cache=root / ".cachehere")
    assert snapshot(root) == before


def test_ingest_never_imports_torch(tmp_path):
    write_tree(tmp_path, {"a.py": "x = 1\n"})
    code = ("import sys, ingest\nfrom tests.ingest.fixtures import make_tokenizer\n"
            f"ingest.pack({str(tmp_path)!r}, make_tokenizer(), ingest.PackOptions())\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    repo = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_progress_reports_files(tmp_path, tok, cache_dir):
    write_tree(tmp_path, {f"m{i}.py": f"v = {i}\n" for i in range(5)})
    calls = []
    options = ingest.PackOptions(token_cache=cache_dir)
    ingest.pack(tmp_path, tok, options, progress=lambda done, total: calls.append((done, total)))
    assert calls[0] == (0, 5) and calls[-1] == (5, 5)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))
    calls.clear()
    ingest.pack(tmp_path, tok, options, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(5, 5)]
