"""ask, chat and summarize through the real CLI with a fake runtime (canned tokens and routing)."""

import importlib.util
import json
import os
import signal

import pytest
from click.testing import CliRunner

from agent.cli import cli
from tests.agent.fakes import FakeRuntime
from tests.ingest.fixtures import write_tree

SETTINGS = '"""Settings."""\n\nRETRY = 5\nMAGIC_NUMBER = 7391046\n\n\ndef load():\n    return RETRY\n'


@pytest.fixture
def repo(tmp_path):
    return write_tree(tmp_path / "repo", {
        "README.md": "# Demo\n\nA demo service.\n",
        "src/settings.py": SETTINGS,
        "src/app.py": "from settings import load\n\n\ndef main():\n    return load()\n" * 3,
    })


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    rt = FakeRuntime(block_size=64)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    return rt


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def test_ask_is_the_default_command_and_streams_answer_then_citations(repo, fake):
    fake.answers = ["The value is 7391046, set in src/settings.py:4."]
    r = run(repo, "What is MAGIC_NUMBER?", "--block-size", "64")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith("The value is 7391046, set in src/settings.py:4.\n")
    assert "Sources (routing strength, origin):" in r.stdout
    assert "src/settings.py:4" in r.stdout and "both" in r.stdout
    assert "packed 3 files" in r.stderr and "context tokens: prefilled" in r.stderr
    assert r.stderr.index("KV cache:") < r.stderr.index("context tokens: prefilled")
    assert "Traceback" not in r.stdout + r.stderr


def test_json_schema_and_cache_hit_on_second_question(repo, fake, monkeypatch):
    monkeypatch.chdir(repo)
    fake.answers = ["It is 7391046.", "Still 7391046."]
    first = json.loads(run("ask", repo, "What is MAGIC_NUMBER?", "--json", "--block-size", "64").stdout)
    assert set(first) == {"answer", "citations", "stats"}
    assert set(first["stats"]) == {"context_tokens", "prefill_s", "decode_tok_s", "cache_hit", "model",
                                   "attention", "block_size", "top_k", "notes", "citation_weights", "stopped",
                                   "answer_limit"}
    assert first["stats"]["cache_hit"] is False and first["stats"]["block_size"] == 64
    assert first["stats"]["stopped"] == "end" and first["stats"]["answer_limit"] == 256  # a what-question
    cite = first["citations"][0]
    assert set(cite) == {"path", "start_line", "end_line", "score", "source"}
    assert (cite["path"], cite["start_line"], cite["source"]) == ("src/settings.py", 4, "routing")
    second = json.loads(run("ask", repo, "Again?", "--json", "--block-size", "64").stdout)
    assert second["stats"]["cache_hit"] is True
    context = second["stats"]["context_tokens"]
    assert context == first["stats"]["context_tokens"]
    assert fake.engines[0].prefills[0] == context  # first run: the whole context
    assert len(fake.engines[1].prefills) == 1 and fake.engines[1].prefills[0] < context / 2  # only the question


def test_text_citations_are_kept_only_when_the_source_map_resolves_them(repo, fake, monkeypatch):
    monkeypatch.chdir(repo)
    fake.answers = ["See settings.py:3 and src/app.py:2-4, not src/nope.py:1 or src/app.py:999."]
    r = json.loads(run("ask", repo, "where?", "--json", "--no-cache").stdout)
    text = {(c["path"], c["start_line"], c["end_line"]) for c in r["citations"] if c["source"] == "text"}
    assert text == {("src/settings.py", 3, 3), ("src/app.py", 2, 4)}
    assert all(c["path"] != "src/nope.py" and c["end_line"] < 999 for c in r["citations"])


USAGE_LINES = ("Usage: ", "Try ", "")  # click prints these around a usage error (exit code 2)


def assert_clean_error(r, code: int, *words: str, alone: bool = True) -> str:
    """A clean CLI failure: exit `code` through SystemExit (an uncaught exception is not one), no
    traceback, exactly one "Error:" line on stderr holding every word, and (alone) nothing else but
    click's usage lines; returns the error line."""
    assert r.exit_code == code, (r.exit_code, r.stderr)
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert len(errors) == 1, r.stderr
    assert all(w in errors[0] for w in words), (errors[0], words)
    if alone:
        assert r.stdout == ""
        others = [line for line in lines if line not in errors]
        assert all(line.startswith(USAGE_LINES) for line in others) if code == 2 else others == [], r.stderr
    return errors[0]


@pytest.mark.parametrize(
    "args,code,words",
    [
        (["ask", "missing-dir", "q?"], 1, ["path not found: missing-dir", "check the spelling"]),
        (["ask", "{repo}", "  "], 2, ["the question is empty", 'moba-ask PATH "your question"']),
        (["ask", "{repo}"], 2, ["give PATH... and then a QUESTION", "moba-ask ."]),
        (["ask", "{repo}", "q?", "--top-k", "0"], 2, ["--top-k", "0"]),
        (["ask", "{repo}", "q?", "--dense-layers", "a,b"], 2, ["dense layers must be", "'a,b'"]),
        (["ask", "{repo}", "q?", "--max-tokens", "20", "--no-drop"], 1, ["over --max-tokens 20", "--no-drop"]),
    ],
)
def test_bad_inputs_fail_with_one_line_and_no_traceback(repo, fake, args, code, words):
    r = CliRunner().invoke(cli, [a.format(repo=repo) for a in args])
    assert_clean_error(r, code, *words)


def test_clean_error_check_refuses_a_crash(repo, fake, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("agent.runtime.load_runtime", crash)
    r = CliRunner().invoke(cli, ["ask", str(repo), "q?", "--no-cache"])
    with pytest.raises(AssertionError):
        assert_clean_error(r, 1, "boom")


def test_unknown_model_is_a_one_line_error(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path))
    r = CliRunner().invoke(cli, ["ask", str(repo), "q?", "-m", "no-such-model"])
    assert_clean_error(r, 1, "unknown model 'no-such-model'", "use a catalog name")


def test_routing_map_html(repo, fake, tmp_path, monkeypatch):
    """The page is titled by the question and the run, and names files as the citations do (from here)."""
    monkeypatch.chdir(tmp_path)
    fake.answers = ["7391046"]
    out = tmp_path / "map.html"
    r = run(repo, "What is <MAGIC_NUMBER>?", "--block-size", "64", "--routing-map", out, "--no-cache")
    assert r.exit_code == 0
    page = out.read_text()
    assert "<h1>What is &lt;MAGIC_NUMBER&gt;?</h1>" in page and "model fake-model" in page and "block 64" in page
    assert '<span class="path">repo/src/settings.py</span>' in page and "lines 1-" in page
    assert '<li><span class="cite">repo/src/settings.py:4</span>' in page
    assert "<script" not in page and "http" not in page  # self-contained: nothing runs, nothing is fetched
    bad = CliRunner().invoke(cli, [str(repo), "q?", "--routing-map", str(tmp_path / "m.txt"), "--no-cache"])
    assert_clean_error(bad, 1, "--routing-map must end in .html or .png", alone=False)


def test_routing_map_png_without_matplotlib_is_refused_before_the_run(repo, fake, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = CliRunner().invoke(cli, [str(repo), "q?", "--routing-map", str(tmp_path / "map.png"), "--no-cache"])
    assert_clean_error(r, 1, "a PNG routing map needs matplotlib", "pip install matplotlib", "or use .html")
    assert fake.engines == [] and not (tmp_path / "map.png").exists()


def test_question_with_undecodable_bytes_is_a_usage_error(repo, fake):
    r = CliRunner().invoke(cli, [str(repo), os.fsdecode(b"where is \xff parsed?"), "--no-cache"])
    assert_clean_error(r, 2, "the question is not valid UTF-8")
    assert fake.engines == []


def test_chat_transcript_reuses_the_context(repo, fake):
    fake.answers = ["It is 7391046.", "RETRY is 5."]
    script = "What is MAGIC_NUMBER?\n/citations\n/files\n/tokens\n/bogus\nAnd RETRY?\n/reset\n/tokens\n/exit\n"
    r = run("chat", repo, "--block-size", "64", "--no-cache", input=script)
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert out.index("It is 7391046.") < out.index("routing strength per file:") < out.index("RETRY is 5.")
    assert "src/settings.py" in out and "src/app.py" in out and "tokens" in out
    assert "unknown command /bogus" in r.stderr
    assert "conversation cleared" in out and out.rstrip().endswith("free " + out.rstrip().split("free ")[-1])
    engine = fake.engines[0]
    context = engine.prefills[0]
    assert len(engine.prefills) == 3 and max(engine.prefills[1:]) < context  # never re-prefilled


def test_chat_ctrl_c_stops_the_answer_not_the_chat(repo, fake):
    fake.answers = ["one two three four five six seven eight nine ten", "after"]
    sent = []

    def ctrl_c_once(n):
        if n == 2 and not sent:
            sent.append(n)
            os.kill(os.getpid(), signal.SIGINT)

    fake.on_token_hook = ctrl_c_once
    r = run("chat", repo, "--no-cache", input="first?\nsecond?\n/exit\n")
    assert r.exit_code == 0
    assert r.stderr.count("[stopped]") == 1 and "after" in r.stdout
    assert "ten" not in r.stdout


def test_summarize_json_and_strengths(repo, fake):
    fake.answers = ["Overview: a demo (src/settings.py:1-4).", "Overview again."]
    r = json.loads(run("summarize", repo, "--json", "--no-cache", "--block-size", "64").stdout)
    assert r["answer"].startswith("Overview") and r["citations"]
    plain = run("summarize", repo, "--no-cache", "--block-size", "64", "--focus", "settings")
    assert "Files by routing strength:" in plain.stdout and "src/settings.py" in plain.stdout


def test_help_lists_commands_with_examples():
    r = run("--help")
    for name in ("ask", "chat", "summarize", "pack", "models", "cache"):
        assert name in r.stdout
    assert "Examples" in run("ask", "--help").stdout


def test_base_model_gets_plain_completion_and_stops_at_the_next_question(repo, monkeypatch, tmp_path):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    rt = FakeRuntime(answers=[" 7391046\n\nQuestion: and RETRY?\nAnswer: 5"], chat=False, block_size=64)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    r = run(repo, "What is MAGIC_NUMBER?", "--no-cache")
    assert r.exit_code == 0
    assert r.stdout.startswith(" 7391046\n") and "Question" not in r.stdout
    prompt = rt.tokenizer.decode(rt.engines[0].ids)
    assert "<|im_start|>" not in prompt and "</file>\n\n\n\nQuestion: What is MAGIC_NUMBER?\nAnswer:" in prompt


def test_auto_attention_is_dense_for_a_small_context_and_says_so(repo, fake):
    fake.answers = ["7391046"] * 4
    small = run("ask", repo, "What is MAGIC_NUMBER?", "--json", "--no-cache")
    assert json.loads(small.stdout)["stats"]["attention"] == "dense"
    shown = run("ask", repo, "What is MAGIC_NUMBER?", "--no-cache")
    assert "attention: dense (auto:" in shown.stderr and "< 32,768 = the CPU floor under which exact" in shown.stderr
    small_blocks = run("ask", repo, "What is MAGIC_NUMBER?", "--no-cache", "--block-size", "4", "--top-k", "2")
    assert "attention: dense (auto:" in small_blocks.stderr  # small blocks do not lower the floor
    forced = run("ask", repo, "What is MAGIC_NUMBER?", "--json", "--no-cache", "--attention", "moba")
    assert json.loads(forced.stdout)["stats"]["attention"] == "moba"
    named = run("ask", repo, "What is MAGIC_NUMBER?", "--no-cache", "--attention", "moba", "--block-size", "4")
    assert "attention: moba, block 4, top-k 6, 1 sink block(s), dense layers -3,-2,-1\n" in named.stderr


def test_answer_length_does_not_change_the_pack_so_the_context_cache_hits(tmp_path, fake):
    files = {f"src/mod{i}.py": "".join(f"def f{i}_{j}():\n    return {j}\n" for j in range(12)) for i in range(12)}
    big = write_tree(tmp_path / "big", files)
    fake.max_positions, fake.answers = 1400, ["short", "longer"]
    first = run("ask", big, "What is f3_2?", "--json", "--max-new-tokens", "50")
    second = run("ask", big, "What is f3_2?", "--json", "--max-new-tokens", "300")
    one, two = json.loads(first.stdout)["stats"], json.loads(second.stdout)["stats"]
    assert one["cache_hit"] is False and two["cache_hit"] is True
    assert one["context_tokens"] == two["context_tokens"]
    assert " 0 dropped" not in first.stderr  # over budget: the budget decides what is packed


@pytest.mark.parametrize("extra", [[], ["--json"]])
def test_progress_without_a_terminal_is_plain_lines_on_stderr(repo, fake, monkeypatch, extra):
    monkeypatch.setattr("agent.commands.progress.PROGRESS_EVERY_S", 0.0)
    fake.answers = ["7391046"]
    r = run("ask", repo, "What is MAGIC_NUMBER?", "--no-cache", *extra)
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(line.startswith("packing: ") and " files" in line for line in lines)
    prefill = [line for line in lines if line.startswith("prefill: ")]
    assert prefill and "tokens" in prefill[-1] and "\x1b" not in r.stderr
    quiet = run("ask", repo, "What is MAGIC_NUMBER?", "--no-cache", "-q", *extra)
    assert quiet.stderr == ""


def test_ticker_lines_carry_rate_and_eta(monkeypatch):
    from agent.commands import progress

    clock = iter([0.0, 1.0, 2.0, 3.0, 9.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines = []
    t = progress.Ticker(lines.append, "prefill", "tokens", every_s=5.0)
    t.update(100, 1000)
    t.update(200, 1000)
    t.update(600, 1000)
    t.update(800, 1000)
    assert lines == ["prefill: 800/1,000 tokens (80%), 89 tokens/s, ETA 2s"]  # t=9s, 5 s after the start


def test_a_slow_step_announces_itself_without_a_terminal(monkeypatch):
    import time

    from agent.commands import common, progress

    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.05)
    lines = []
    ui = common.Progress(quiet=False)
    monkeypatch.setattr(ui, "_plain", lines.append)
    with ui.status("loading model"):
        time.sleep(0.5)
    with ui.status("quick"):
        pass
    time.sleep(0.2)
    assert lines == ["loading model ..."]


def test_citation_paths_open_from_the_current_directory(repo, fake, monkeypatch):
    monkeypatch.chdir(repo.parent)
    fake.answers = ["It is 7391046 (src/settings.py:4).", "Again 7391046.", "Once more 7391046."]
    shown = run("ask", "repo/src", "What is MAGIC_NUMBER?", "--no-cache", "--block-size", "64")
    assert "  repo/src/settings.py:4" in shown.stdout and "  settings.py:4" not in shown.stdout
    doc = json.loads(run("ask", "repo/src", "What?", "--json", "--no-cache", "--block-size", "64").stdout)
    assert {c["path"] for c in doc["citations"]} == {"repo/src/settings.py"}
    absolute = run("ask", "repo/src", "What?", "--json", "--no-cache", "--block-size", "64", "--absolute-paths")
    paths = {c["path"] for c in json.loads(absolute.stdout)["citations"]}
    assert paths == {str(repo / "src" / "settings.py")}


def test_summarize_says_how_many_sections_cite_nothing(repo, fake):
    fake.answers = ["Overview: a demo.\n\nSettings: RETRY and MAGIC_NUMBER (src/settings.py:3-4).\n\nApp: main."]
    r = run("summarize", repo, "--json", "--no-cache", "--block-size", "64")
    doc = json.loads(r.stdout)
    assert "2 of 3 section(s) of the summary cite no lines of the pack" in " ".join(doc["stats"]["notes"])
    assert "note: 2 of 3 section(s)" in r.stderr and any(p.endswith("src/settings.py") for p in doc["files"])


def test_summarize_focus_with_undecodable_bytes_is_a_usage_error(repo, fake):
    r = CliRunner().invoke(cli, ["summarize", str(repo), "--focus", os.fsdecode(b"risks \xff"), "--no-cache"])
    assert_clean_error(r, 2, "--focus is not valid UTF-8")
    assert fake.engines == []


def test_check_utf8_refuses_lone_surrogates_only():
    """What ask, summarize and each chat line go through: undecodable bytes (lone surrogates) are refused."""
    import click as _click

    from agent.commands.common import check_utf8

    with pytest.raises(_click.UsageError, match="the question is not valid UTF-8"):
        check_utf8(os.fsdecode(b"\xfe\xff"), "the question")
    check_utf8("ordinary é question", "the question")


def test_chat_files_marks_outlined_files(tmp_path, fake):
    body = "".join(f"def step_{i}(x, y):\n    total = x + y * {i}\n    return total - {i}\n\n\n" for i in range(60))
    root = write_tree(tmp_path / "big", {"core.py": body, "settings.py": SETTINGS})
    r = run("chat", root, "--max-tokens", "2500", "--no-cache", input="/files\n/exit\n")
    assert r.exit_code == 0, r.stderr
    core = next(line for line in r.stdout.splitlines() if "core.py " in line)
    settings = next(line for line in r.stdout.splitlines() if "settings.py " in line)
    assert core.endswith("(outline: signatures only)") and settings.endswith(" lines")
