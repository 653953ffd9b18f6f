"""Session: which query positions the routing recorder covers (question + first answer tokens), the
MoBA settings it hands its engine, and the routing products an answer carries."""

import pytest

import ingest
from agent.citations import file_strengths
from agent.config import AskConfig
from agent.session import ANSWER_ROUTING_TOKENS, Session
from moba.hf import MobaParams
from tests.agent.fakes import FakeRuntime
from tests.ingest.fixtures import write_tree


def test_routing_covers_the_question_and_only_the_first_answer_tokens(tmp_path):
    root = write_tree(tmp_path / "repo", {"settings.py": "MAGIC_NUMBER = 7391046\n"})
    rt = FakeRuntime(answers=[" ".join(["word"] * (ANSWER_ROUTING_TOKENS + 30))])
    pack = ingest.pack([root], rt.tokenizer, ingest.PackOptions())
    session = Session(rt, pack, AskConfig(no_cache=True, max_new_tokens=200))
    session.open()
    answer = session.ask("What is the magic number?")
    positions = sorted({int(p) for recs in answer.recorder.records.values() for r in recs for p in r.positions})
    question_end = answer.recorder.end - ANSWER_ROUTING_TOKENS
    assert len(answer.tokens) > ANSWER_ROUTING_TOKENS + 10
    assert positions[0] == session.context_len and positions[-1] == answer.recorder.end - 1
    assert question_end - session.context_len == answer.stats["question_tokens"]


def _session(tmp_path, mode="ask", answer="The value is 7391046, see settings.py:2.", **cfg) -> Session:
    readme = "# Demo\n\n" + "".join(f"Line {i} of the readme.\n" for i in range(40))
    settings = "RETRY = 5\nMAGIC_NUMBER = 7391046\n\n\ndef load():\n    return RETRY\n"
    root = write_tree(tmp_path / "repo", {"settings.py": settings, "README.md": readme})
    rt = FakeRuntime(answers=[answer], block_size=64)
    pack = ingest.pack([root], rt.tokenizer, ingest.PackOptions())
    session = Session(rt, pack, AskConfig(no_cache=True, max_new_tokens=200, block_size=64, **cfg), mode)
    session.open()
    return session


def test_the_context_prefill_asks_for_no_logits_and_each_question_for_its_own(tmp_path):
    session = _session(tmp_path)
    session.ask("What is the magic number?")
    assert session.engine.logits_asked == [False, True]


def test_the_engine_runs_the_sessions_params(tmp_path):
    session = _session(tmp_path, attention="dense", top_k=3, local_blocks=1, gate_subblocks=2)
    want = MobaParams(block_size=64, top_k=3, sink_blocks=1, dense_layers=(0, 1), local_blocks=1, gate_subblocks=2)
    assert session.params == want and session.engine.params == want


def test_an_answer_carries_its_routing_products(tmp_path):
    session = _session(tmp_path)
    answer = session.ask("What is MAGIC_NUMBER?")
    assert next(iter(answer.strengths)) == "settings.py" and sum(answer.strengths.values()) == pytest.approx(1)
    expected = file_strengths(answer.recorder, session.smap, block_size=64, sink_blocks=1)
    assert answer.strengths == expected
    routed = {b for counts in answer.routing.per_layer.values() for b in counts}
    assert routed and set(answer.routing.spans) == routed
    assert any(path == "settings.py" for b in routed for path, _, _ in answer.routing.spans[b])
    assert all(b >= 1 for b in routed)  # the sink block is attended by rule, never counted as routed


def test_a_summary_says_how_many_sections_cite_nothing(tmp_path):
    text = "Overview: a demo.\n\nSettings: MAGIC_NUMBER (settings.py:2).\n\nReadme: a title."
    answer = _session(tmp_path, mode="summarize", answer=text).ask("")
    assert any(n.startswith("2 of 3 section(s) of the summary cite no lines") for n in answer.notes)
