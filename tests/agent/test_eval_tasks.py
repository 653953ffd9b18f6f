"""The eval task builder on a fixture repository with known functions, classes and constants."""

import re

import pytest

import ingest
from agent.evaluate.tasks import CALLER, CLASS, CONSTANT, FUNCTION, TaskError, build_workspace, question_text
from tests.agent.fakes import fake_tokenizer
from tests.ingest.fixtures import git_repo, snapshot, write_tree

ADJ = ["rolling", "weighted", "clipped", "scaled", "smoothed", "ranked"]
NOUN = ["average", "median", "total", "spread", "maximum"]


def docstring(i: int, j: int) -> str:
    return f"Compute the {ADJ[i]} {NOUN[j]} of the items, following rule {i}-{j}, and return it."


def module(i: int) -> str:
    funcs = []
    for j in range(len(NOUN)):
        funcs.append(
            f"def calc_{ADJ[i]}_{NOUN[j]}(items, factor={j + 1}):\n"
            f'    """{docstring(i, j)}\n\n    The factor scales every item first.\n    """\n'
            f"    marker = 'needle-{i}-{j}'\n"
            f"    total = sum(x * factor for x in items)\n"
            f"    return total, marker\n"
        )
    funcs.append("def helper(items):\n    return list(items)  # same name in every module: never a needle\n")
    funcs.append(f'def inline_{i}():\n    """A docstring sharing its line with code is never cut out."""; return {i}\n')
    funcs.append(f'def only_doc_{i}():\n    """This function has only its docstring and nothing else at all."""\n')
    if i:  # the one caller, in another module, of the previous module's calc_*_average
        funcs.append(f"def report_{i}(items):\n    return calc_{ADJ[i - 1]}_average(items)\n")
    head = f'"""Module {i} of the fixture."""\n\nLIMIT_{ADJ[i].upper()} = {i * 10}\n\n\n'
    cls = f'class Engine{ADJ[i].title()}:\n    """An engine for module {i}."""\n\n    size = {i}\n'
    return head + "\n\n".join(funcs) + "\n\n" + cls


def make_repo(root, modules: int = 6):
    files = {"README.md": "# Fixture\n\nNumbers in, numbers out.\n"}
    files |= {f"pkg/mod{i}.py": module(i) for i in range(modules)}
    write_tree(root, files)
    git_repo(root, list(files))
    return root


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    return make_repo(tmp_path / "repo")


@pytest.fixture(scope="module")
def tok():
    return fake_tokenizer()


def build(repo, tok, n=9, seed=0, context=200_000):
    return build_workspace(str(repo), tok, context_tokens=context, n_tasks=n, seed=seed)


def test_same_seed_same_tasks_and_other_seeds_choose_others(repo, tok):
    first, again = build(repo, tok), build(repo, tok)
    assert first.tasks == again.tasks
    picks = {tuple(t.name for t in build(repo, tok, seed=s).tasks) for s in range(5)}
    assert len(picks) > 1


def test_half_needles_a_quarter_definitions_a_quarter_callers_sorted_by_depth(repo, tok):
    ws = build(repo, tok, n=9)
    kinds = [t.kind for t in ws.tasks]
    assert kinds.count(FUNCTION) == 5 and kinds.count(CALLER) == 2 and len(kinds) == 9
    assert set(kinds) - {FUNCTION, CALLER} <= {CLASS, CONSTANT}
    depths = [t.depth for t in ws.tasks]
    assert depths == sorted(depths) and all(0 < d < 1 for d in depths)
    prefix = {FUNCTION: "fn", CLASS: "cls", CONSTANT: "const", CALLER: "call"}
    assert [t.id for t in ws.tasks][:2] == ["01-" + prefix[kinds[0]], "02-" + prefix[kinds[1]]]


def test_needles_are_spread_one_per_module(repo, tok):
    ws = build(repo, tok, n=12)
    paths = [t.path for t in ws.tasks if t.kind == FUNCTION]
    assert sorted(paths) == [f"pkg/mod{i}.py" for i in range(6)]  # 6 equal slices over 6 equal modules


def test_gold_lines_point_at_the_function_in_the_packed_copy(repo, tok):
    ws = build(repo, tok)
    for t in ws.tasks:
        lines = ws.texts[t.path].split("\n")
        sm = ws.pack.source_map
        a, b = sm.line_tokens(t.path, t.start_line)
        shown = tok.decode(ws.pack.ids[a:b].tolist())
        if t.kind == FUNCTION:
            assert lines[t.start_line - 1].startswith(f"def {t.name}(")
            assert lines[t.end_line - 1].strip() == "return total, marker"
            assert f"def {t.name}(" in shown and t.code == "\n".join(lines[t.start_line - 1: t.end_line])
            assert re.search(rf"^\s*{t.start_line}\| def {t.name}\(", ws.pack.text, re.M)
        elif t.kind == CALLER:
            assert lines[t.start_line - 1].startswith(f"def {t.name}(") and "_average(items)" in lines[t.end_line - 1]
        elif t.kind == CLASS:
            assert t.start_line == t.end_line and f"class {t.name}:" in shown
        else:
            assert t.start_line == t.end_line and f"{t.name} = " in shown


def test_needle_docstrings_are_absent_from_the_pack_and_the_rest_kept(repo, tok):
    ws = build(repo, tok)
    needles = [t for t in ws.tasks if t.kind == FUNCTION]
    for t in needles:
        i, j = ADJ.index(t.name.split("_")[1]), NOUN.index(t.name.split("_")[2])
        assert docstring(i, j) not in ws.pack.text
        assert f"following rule {i}-{j}" in t.question and t.name not in t.question
        assert t.question.startswith("Which function does this, and in which file?")
    others = sum(docstring(i, j) in ws.pack.text for i in range(6) for j in range(5))
    assert others == 30 - len(needles)
    assert "The factor scales every item first." in ws.pack.text


def test_unusable_functions_are_never_needles(repo, tok):
    ws = build(repo, tok, n=200)
    names = {t.name for t in ws.tasks if t.kind == FUNCTION}
    assert len(names) == 30
    assert not any(n == "helper" or n.startswith(("inline_", "only_doc_")) for n in names)
    defs = {t.name for t in ws.tasks if t.kind != FUNCTION}
    assert {f"Engine{a.title()}" for a in ADJ} <= defs and {f"LIMIT_{a.upper()}" for a in ADJ} <= defs


def test_budget_drops_files_and_tasks_come_only_from_packed_files(repo, tok):
    full = build(repo, tok)
    small = build(repo, tok, context=full.pack.total_tokens // 2)
    assert len(small.pack.files) < len(full.pack.files)
    packed = {f.path for f in small.pack.files}
    assert small.tasks and all(t.path in packed for t in small.tasks)


def test_the_repository_is_never_written(repo, tok):
    before = snapshot(repo)
    build(repo, tok)
    assert snapshot(repo) == before


def test_no_python_is_a_clear_error(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    root = write_tree(tmp_path / "docs", {"README.md": "# Only words\n", "notes.txt": "nothing to ask\n"})
    with pytest.raises(TaskError, match="no Python functions with docstrings"):
        build(root, tok)


def test_question_text_masks_the_name_and_caps_words():
    doc = "Run parse_config on the file.\n\nLike self.parse_config(x), not reparse_config.\n\n" + "word " * 200
    q = question_text(doc, "parse_config")
    assert q.startswith("Run this function on the file.\nLike self.this function(x), not reparse_config.")
    assert "parse_config(" not in q and len(q.split()) <= 120


def test_files_are_taken_in_pack_order_and_a_file_too_big_is_skipped(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    big = "\n".join(f"VALUE_{i} = {i}" for i in range(400)) + "\n"
    root = write_tree(tmp_path / "r", {"a.py": module(0), "b.py": big, "c.py": module(1), "d.py": module(2)})
    full = ingest.pack(root, tok)
    sizes = {f.path: f.tokens for f in full.files}
    ws = build(root, tok, context=full.tree_tokens + sizes["a.py"] + sizes["c.py"] + 20)
    assert [f.path for f in ws.pack.files] == ["a.py", "c.py"]
    few = build(root, tok, n=12, context=full.tree_tokens + sizes["a.py"] + 20)
    assert [t.kind for t in few.tasks].count(FUNCTION) == 5 and len(few.tasks) == 7  # definitions fill in
    with pytest.raises(TaskError, match="--context-tokens 50 is too small for any file"):
        build(root, tok, context=50)


def test_caller_tasks_name_the_one_caller_in_another_file_and_the_question_hides_it(repo, tok):
    ws = build(repo, tok, n=200)
    callers = {t.name: t for t in ws.tasks if t.kind == CALLER}
    assert set(callers) == {f"report_{i}" for i in range(1, 6)}  # calls within a module never qualify
    for i in range(1, 6):
        t = callers[f"report_{i}"]
        assert t.path == f"pkg/mod{i}.py" and t.question.startswith(f"Which function calls `calc_{ADJ[i - 1]}_average`?")
        assert f"report_{i}" not in t.question and t.end_line == t.start_line + 1
        assert t.code == ws.texts[t.path].split("\n")[t.start_line - 1] + "\n" + f"    return calc_{ADJ[i - 1]}_average(items)"
