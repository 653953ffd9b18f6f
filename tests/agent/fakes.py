"""A fake runtime for CLI and session tests: a real tiny tokenizer, an engine that replays canned
answers and canned routing, so that packing, prompts, sessions, citations and the CLI run for
real without a model.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

import moba
from agent.session import Runtime
from moba.types import Routing
from tests.ingest.fixtures import SPECIAL, make_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def fake_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), eos_token=SPECIAL)
    if chat:
        tok.chat_template = CHATML
    return tok


class FakeEngine:
    """Engine double: tracks the token ids in its 'cache', replays canned answers, and records
    routing that points at the first token whose text contains `target` (the evidence)."""

    def __init__(self, runtime: FakeRuntime, capacity: int, params=None):
        self.rt, self.capacity, self.ids, self.params = runtime, capacity, [], params
        self.cache = self
        self.block_size = runtime.block_size
        self._target_at: int | None = None  # the target's token index, kept while the ids before it stay
        self.prefills: list[int] = []
        self.logits_asked: list[bool] = []  # per prefill: did the caller want its logits

    @property
    def length(self) -> int:
        return len(self.ids)

    def prefill(self, ids, progress=None, logits=True):
        self.prefills.append(len(ids))
        self.logits_asked.append(logits)
        self.ids += [int(i) for i in ids]
        if progress:
            progress(len(ids), len(ids))
        self._record(len(self.ids) - len(ids), len(self.ids))
        return torch.zeros(4) if logits else None

    def generate(self, logits, sampling, stop_ids=frozenset(), on_token=None):
        text = self.rt.answers.pop(0) if self.rt.answers else "no more canned answers"
        ids = self.rt.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.stop_reason = "length" if len(ids) > sampling.max_new_tokens else "end"
        out = []
        for tok in ids[: sampling.max_new_tokens]:
            out.append(tok)
            self.ids.append(tok)
            self._record(len(self.ids) - 1, len(self.ids))
            if self.rt.on_token_hook:
                self.rt.on_token_hook(len(out))
            if on_token and on_token(tok):
                self.stop_reason = "callback"
                break
        return out

    def truncate(self, n):
        del self.ids[n:]
        if self._target_at is not None and self._target_at >= n:
            self._target_at = None

    config = type("Cfg", (), dict(num_hidden_layers=2, num_key_value_heads=1, head_dim=4))
    kv_heads = 1
    dtype = torch.float32

    def kv_bytes(self, tokens=None):
        return 2 * 2 * 1 * 4 * self.capacity * 4

    def export(self, n):
        return {f"k.{i}": torch.tensor(self.ids[:n]) for i in range(2)} | {f"v.{i}": torch.zeros(n) for i in range(2)}

    def restore(self, tensors):
        self.ids, self._target_at = tensors["k.0"].tolist(), None
        return len(self.ids)

    def _record(self, start: int, end: int) -> None:
        rec = moba.capture.active_recorder()
        target = self._target()
        if rec is None or target is None or not rec.wants(0, start, end):
            return
        bs, n = self.rt.block_size, end - start
        blocks = torch.full((1, 2, n, 3), -1, dtype=torch.long)
        blocks[..., 0] = torch.arange(start, end) // bs
        blocks[..., 1] = target // bs
        scores = torch.where(blocks >= 0, 1.0, float("-inf"))
        sl = rec.record(0, start, Routing(blocks, scores), dense=False)
        mass = torch.zeros(end)
        mass[target] = float(sl.stop - sl.start)
        rec.add_key_mass(mass)

    def _target(self) -> int | None:
        if self._target_at is None:
            tok = self.rt.tokenizer
            self._target_at = next((i for i in range(len(self.ids)) if self.rt.target in tok.decode(self.ids[: i + 1])),
                              None)
        return self._target_at


class FakeRuntime(Runtime):
    """Runtime with canned answers. `target`: text whose first token the routing points at."""

    def __init__(self, answers=(), target="7391046", chat=True, block_size=256, max_positions=4096):
        tok = fake_tokenizer(chat)
        super().__init__(tok, self._make, "fake-model", chat, max_positions, num_layers=2,
                         stop_ids=frozenset({tok.eos_token_id}))
        self.answers, self.target, self.block_size = list(answers), target, block_size
        self.engines: list[FakeEngine] = []
        self.on_token_hook = None

    def _make(self, capacity: int, params=None) -> FakeEngine:
        self.engines.append(FakeEngine(self, capacity, params))
        return self.engines[-1]
