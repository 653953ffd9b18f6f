"""Session: which query positions the routing recorder covers (question + first answer tokens)."""

import ingest
from agent.config import AskConfig
from agent.session import ANSWER_ROUTING_TOKENS, Session
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
