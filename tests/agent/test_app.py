"""agent.app on the fake runtime: a session opened through load, pack, settle, fit checks and prefill,
its progress told to a reporter, and bad input raised as library errors (the CLI turns them into lines)."""

import contextlib

import pytest

import ingest
from agent import app
from agent.config import AskConfig, SettingError
from tests.agent.fakes import FakeRuntime
from tests.ingest.fixtures import write_tree


class Lines:
    """A Reporter that keeps what it is told."""

    def __init__(self):
        self.lines, self.tracked = [], []

    def status(self, text):
        self.lines.append(text)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def track(self, label, unit):
        yield lambda done, total: self.tracked.append((label, done, total))

    def say(self, line):
        self.lines.append(line)


@pytest.fixture
def rt(monkeypatch):
    rt = FakeRuntime(answers=["It is 7391046."], block_size=64, max_positions=4096)
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    return rt


@pytest.fixture
def repo(tmp_path):
    return write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n", "README.md": "# Demo\n"})


def test_open_session_settles_prefills_and_reports(rt, repo):
    ui = Lines()
    cfg = AskConfig(no_cache=True, block_size=64)
    session = app.open_session([repo], cfg, ingest.PackOptions(), "ask", ui, question="What is it?")
    assert session.config.attention == "dense" and session.config.dense_layers == (-3, -2, -1)  # settled on CPU
    assert session.engine.length == session.context_len and rt.engines[-1].params == session.params
    said = "\n".join(ui.lines)
    for part in ("loading model", "packed 2 files", "attention: dense (auto:", "KV cache:", "context tokens: prefilled"):
        assert part in said
    assert {label for label, *_ in ui.tracked} == {"packing", "prefill"}


@pytest.mark.parametrize(("cfg", "question", "message"), [
    (dict(max_tokens=10_000), "q?", "--max-tokens 10,000 does not fit fake-model's window"),
    (dict(), "why " * 5000, "or a shorter question"),
])
def test_bad_input_is_a_setting_error_before_prefill(rt, repo, cfg, question, message):
    with pytest.raises(SettingError, match=message):
        app.open_session([repo], AskConfig(no_cache=True, **cfg), ingest.PackOptions(), "ask", Lines(), question)
    assert all(e.prefills == [] for e in rt.engines)


def test_the_auto_reason_names_the_rule_that_decided():
    from agent.config import settle

    cfg = AskConfig(block_size=256, top_k=6)
    below = app._why(cfg, settle(cfg, 30_000, "cpu"), 30_000, "cpu")
    assert "(auto: 30,000 tokens < 32,768 = the CPU floor under which exact attention answered better" in below
    above = app._why(cfg, settle(cfg, 40_000, "cpu"), 40_000, "cpu")
    assert "(auto: 40,000 tokens >= 32,768 = the CPU floor" in above
    gpu = app._why(cfg, settle(cfg, 40_000, "cuda"), 40_000, "cuda")
    assert "(auto: 40,000 tokens < 65,536 = the GPU floor" in gpu
    assert "(auto: 70,000 tokens >= 65,536 = the GPU floor" in app._why(cfg, settle(cfg, 70_000, "cuda"), 70_000, "cuda")
    big = AskConfig(block_size=4096, top_k=12)
    assert "(auto: 40,000 tokens < 393,216 = 8 x top-k 12 x block 4096;" in app._why(big, settle(big, 40_000, "cpu"), 40_000, "cpu")
    assert app._why(AskConfig(attention="moba"), AskConfig(attention="moba"), 30_000, "cpu") == ""
