"""Generation guards: the repetition penalty, the stop when an answer loops, answer lengths by question."""

import pytest
import torch

from agent.config import ANSWER_TOKENS, AskConfig, answer_room, answer_tokens
from agent.engine import PENALTY_WINDOW, Engine, RepetitionGuard, Sampling, repeating_tail
from tests.tinymodels import tiny_model

CYCLE = [10, 11, 12, 13, 14]


class LoopingModel(torch.nn.Module):
    """A tiny real model (its cache fills as usual) whose logits always pick the next token of CYCLE."""

    def __init__(self, margin: float = 20.0, alternative: float = 0.0):
        super().__init__()
        self.lm = tiny_model("llama", block_size=16, top_k=3)
        self.model, self.config, self.margin, self.alternative = self.lm.model, self.lm.config, margin, alternative

    def forward(self, input_ids, **kw):
        out = self.lm(input_ids=input_ids, **kw)
        last = int(input_ids[0, -1])
        nxt = CYCLE[(CYCLE.index(last) + 1) % len(CYCLE)] if last in CYCLE else CYCLE[0]
        out.logits[0, -1] = 0.0
        out.logits[0, -1, 50] = self.alternative
        out.logits[0, -1, nxt] = self.margin
        return out


def test_a_looping_model_stops_early_and_says_so():
    e = Engine(LoopingModel(), capacity=400)
    logits = e.prefill([1, 2, 3])
    out = e.generate(logits, Sampling(max_new_tokens=200, repeat_stop=3))
    assert e.stop_reason == "repetition"
    assert 32 <= len(out) <= 32 + 8 + len(CYCLE)
    e.truncate(3)
    assert len(e.generate(logits, Sampling(max_new_tokens=200))) == 200 and e.stop_reason == "length"


def test_penalty_breaks_a_weak_loop_without_the_stop():
    e = Engine(LoopingModel(margin=1.0, alternative=0.5), capacity=400)
    logits = e.prefill([1, 2, 3])
    plain = e.generate(logits, Sampling(max_new_tokens=12))
    assert plain == (CYCLE * 3)[:12]
    e.truncate(3)
    guarded = e.generate(logits, Sampling(max_new_tokens=12, repetition_penalty=2.5))
    assert guarded[:6] == [*CYCLE, 50]


def test_guard_penalizes_only_recent_answer_tokens_and_forgets_old_ones():
    g = RepetitionGuard(2.0, 0)
    logits = torch.tensor([4.0, -4.0, 4.0, 1.0])
    assert torch.equal(g.penalize(logits), logits)
    out = []
    for t in (0, 1):
        out.append(t)
        g.loops(t, out)
    assert g.penalize(logits).tolist() == [2.0, -8.0, 4.0, 1.0]
    for _ in range(PENALTY_WINDOW):
        out.append(3)
        g.loops(3, out)
    assert g.penalize(logits).tolist() == [4.0, -4.0, 4.0, 0.5]


@pytest.mark.parametrize("tokens, copies, period", [
    ([7] * 32, 3, 1),
    ([7] * 31, 3, 0),
    ([1, 2] + [5, 6, 7, 8] * 8, 3, 4),
    (list(range(20)) * 3, 3, 20),
    (list(range(20)) * 2, 3, 0),
    (list(range(100)), 3, 0),
])
def test_repeating_tail(tokens, copies, period):
    assert repeating_tail(tokens, copies) == period


def test_answer_length_follows_the_question_unless_given():
    cfg = AskConfig()
    assert answer_tokens(cfg, "ask", "Where is the config parsed?") == ANSWER_TOKENS["short"]
    assert answer_tokens(cfg, "ask", "How does the gate choose blocks?") == ANSWER_TOKENS["explain"]
    assert answer_tokens(cfg, "summarize", "") == ANSWER_TOKENS["summarize"]
    assert answer_tokens(AskConfig(max_new_tokens=7), "summarize", "") == 7
    assert max(ANSWER_TOKENS.values()) <= answer_room(10**6)
    assert answer_room(2048) == 512
