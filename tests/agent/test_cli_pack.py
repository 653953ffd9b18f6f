"""`moba-ask pack` through click's CliRunner, with a tiny tokenizer saved as tokenizer.json (no downloads)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from agent.commands.pack import pack as pack_cmd
from tests.ingest.fixtures import git_repo, make_tokenizer, snapshot, write_tree

FILES = {
    "README.md": "# Demo\n\nA demo project.\n",
    "src/app.py": "import os\n\ndef main():\n    return os.getcwd()\n",
    "src/util/helpers.py": "def helper(x):\n    return x + 1\n" * 20,
    "tests/test_app.py": "def test_main():\n    assert True\n",
    ".env": "TOKEN=abc\n",
    "logo.png": b"\x89PNG\r\n\x1a\n\x00",
}


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    tok_path = tmp_path / "tok" / "tokenizer.json"
    tok_path.parent.mkdir()
    make_tokenizer().save(str(tok_path))
    monkeypatch.setenv("MOBA_ASK_MODEL", str(tok_path))
    repo = write_tree(tmp_path / "repo", FILES)
    git_repo(repo, commit=["README.md", "src/app.py"])
    return repo, tok_path


def run(*args):
    return CliRunner().invoke(pack_cmd, [str(a) for a in args])


def one_line_error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_json_report_schema(env):
    repo, _ = env
    result = run(repo, "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert {"total_tokens", "files", "skipped", "dropped"} <= set(data)
    assert isinstance(data["total_tokens"], int) and data["dropped"] == []
    for f in data["files"]:
        assert {"path", "tokens", "token_start", "token_end", "lines"} <= set(f)
        assert f["token_end"] - f["token_start"] == f["tokens"] and "\\" not in f["path"]
    assert [f["path"] for f in data["files"]] == ["README.md", "src/app.py", "src/util/helpers.py",
                                                  "tests/test_app.py"]
    ends = [(f["token_start"], f["token_end"]) for f in data["files"]]
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:])) and ends[-1][1] == data["total_tokens"]
    skipped = {s["path"]: s["reason"] for s in data["skipped"]}
    assert skipped[".env"].startswith("looks like a secret") and skipped["logo.png"] == "binary (image)"
    assert "packed 4 files" in result.stderr


def test_text_to_stdout_and_summary_to_stderr(env):
    repo, tok_path = env
    result = run(repo, "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Packed repository repo: 4 files.")
    assert '<file path="src/app.py" lines="4">\n1| import os\n' in result.stdout
    assert "packed 4 files" in result.stderr and "largest files:" in result.stderr
    assert "skipped 2:" in result.stderr and ".env" in result.stderr and "packed" not in result.stdout[-200:]
    plain = run(repo, "-o", "-", "--no-line-numbers", "-q", "-m", tok_path.parent)
    assert "\nimport os\n" in plain.stdout and plain.stderr == ""


def test_output_file_and_no_writes_in_tree(env, tmp_path):
    repo, _ = env
    before = snapshot(repo)
    out = tmp_path / "packed.txt"
    result = run(repo, "-o", out, "--max-tokens", "100000")
    assert result.exit_code == 0, result.stderr
    assert out.read_text().startswith("Packed repository") and snapshot(repo) == before
    inside = repo / "ctx.txt"
    assert run(repo, "-o", inside, "-q").exit_code == 0
    again = json.loads(run(repo, "-o", inside, "--json", "-q").stdout)
    assert "ctx.txt" not in {f["path"] for f in again["files"]}


def test_budget_outlines_drops_and_no_drop(env):
    repo, _ = env
    full = json.loads(run(repo, "--json", "-q").stdout)["total_tokens"]
    data = json.loads(run(repo, "--json", "--max-tokens", full - 10).stdout)
    assert data["total_tokens"] <= full - 10 and data["dropped"] == []
    assert [o["path"] for o in data["outlined"]] == ["src/util/helpers.py"]
    assert data["outlined"][0]["reason"] == ("over budget: least central (0 files mention 'helpers'); "
                                             "outline by python ast")
    assert data["outlined"][0]["tokens"] < data["outlined"][0]["full_tokens"]
    assert {f["path"]: f["flags"] for f in data["files"]}["src/util/helpers.py"] == ["outline"]
    one_line_error(run(repo, "--max-tokens", full - 10, "--no-drop"), "over --max-tokens", "--no-drop")
    one_line_error(run(repo, "--max-tokens", 3), "too small")


def test_every_outlined_and_dropped_file_is_reported(tmp_path, env):
    many = {f"src/mod_{i:02}.py": "".join(f"def fn_{i}_{k}(a, b):\n    return a + b * {k}\n\n" for k in range(12))
            for i in range(14)}
    many |= {f"notes/note_{i:02}.txt": f"note {i}: some words about the project\n" * 12 for i in range(13)}
    repo = write_tree(tmp_path / "many", many)
    full = json.loads(run(repo, "--json", "-q").stdout)["total_tokens"]
    result = run(repo, "--json", "--max-tokens", full // 3)
    data = json.loads(result.stdout)
    outlined, dropped = [o["path"] for o in data["outlined"]], [d["path"] for d in data["dropped"]]
    assert len(outlined) > 10 and len(dropped) > 10 and set(outlined) | set(dropped) <= set(many)
    assert {f["path"] for f in data["files"]} | set(dropped) == set(many)
    assert set(outlined) == {f["path"] for f in data["files"] if "outline" in f["flags"]}
    assert all(set(o) == {"path", "tokens", "full_tokens", "reason"} for o in data["outlined"])
    assert all(set(d) == {"path", "tokens", "reason"} for d in data["dropped"])
    err = result.stderr.splitlines()
    for title, paths in (("outlined (signatures only, over budget)", outlined), ("dropped (over budget)", dropped)):
        at = err.index(f"{title} {len(paths)}:")
        listed = err[at + 1:at + 11]
        assert all(any(p + ":" in row for row in listed) for p in paths[:10])
        assert not any(p + ":" in row for p in paths[10:] for row in listed)
        assert err[at + 11] == f"  ... and {len(paths) - 10} more (see --json)"


def test_include_exclude_and_flags(env):
    repo, _ = env
    data = json.loads(run(repo, "--json", "--include", "src/", "--exclude", "util/").stdout)
    assert [f["path"] for f in data["files"]] == ["src/app.py"]
    data = json.loads(run(repo, "--json", "--allow-secrets").stdout)
    assert ".env" in {f["path"] for f in data["files"]}


def test_bad_inputs_exit_with_one_line(env, tmp_path):
    repo, _ = env
    one_line_error(run(tmp_path / "missing"), "path not found", "check the spelling")
    empty = tmp_path / "empty"
    empty.mkdir()
    git_repo(empty)
    one_line_error(run(empty), "no files to pack")
    one_line_error(run(repo, "-m", tmp_path / "nope.json"), "tokenizer")
    (tmp_path / "bad.json").write_text("{}")
    one_line_error(run(repo, "-m", tmp_path / "bad.json"), "cannot read tokenizer")
    bad = run(repo, "--json", "-o", "-")
    assert bad.exit_code == 2 and "pick one" in bad.stderr
    assert run().exit_code == 2


def test_help_has_examples():
    result = run("--help")
    assert result.exit_code == 0 and "Examples:" in result.stdout and "--max-tokens" in result.stdout


def test_model_dirs_load_as_the_agent_loads_them(env, tmp_path, monkeypatch):
    repo, tok_path = env
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer.json").write_text(tok_path.read_text())
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    calls = []
    with monkeypatch.context() as m:
        m.setattr("agent.load.load_tokenizer", lambda name: calls.append(name) or make_tokenizer())
        assert run(repo, "-m", model, "-q").exit_code == 0 and calls == [str(model)]
    bare = json.loads(run(repo, "--json", "-q", "-m", tok_path).stdout)
    via_transformers = json.loads(run(repo, "--json", "-q", "-m", model).stdout)
    assert via_transformers["total_tokens"] == bare["total_tokens"]
    one_line_error(run(repo, "-m", "some-catalog-name"), "unknown model 'some-catalog-name'")
