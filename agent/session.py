"""A question-answering session over one packed context: prompt layout, prefill (or a context
cache hit), turns that reuse the prefilled context, routing capture and citations.

Routing (for citations) is recorded for the question tokens and the first ANSWER_ROUTING_TOKENS
answer tokens; later answer tokens decode on the engine's fast path (a CUDA graph on a GPU), which
records nothing. Citations weigh the recorded per-head evidence with the model's calibrated head
weights (`agent.headweights`), or every head alike with a note when it has none; routing becomes an
answer's citations, per-file strengths and routing counts here (`Session.ask`), with the session's
MobaParams (`agent.config.params_for`), the same ones its engine runs. It composes a runtime
(tokenizer + engine), an `ingest.Pack` and the prompts. It knows nothing of terminals: callbacks
report progress and stream tokens; the CLI renders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import prompts
from agent import citations as cit
from agent import headweights
from agent.config import AskConfig, SettingError, answer_room, answer_tokens, params_for
from agent.engine import Sampling
from ingest import tokens
from moba.capture import RoutingRecorder, capture_routing
from moba.hf import dense_queries

DOCS_MARK = "\u0000MOBA_ASK_DOCUMENTS\u0000"
ANSWER_ROUTING_TOKENS = 48


@dataclass
class Runtime:
    """What a session needs from a loaded model.

    tokenizer: a transformers fast tokenizer. make_engine(capacity, params) -> an `agent.engine.Engine`
    running those MobaParams (or a test double with prefill/generate/truncate/length/cache). name: the
    model name. chat: the tokenizer has a chat template. max_positions: the model's context limit.
    num_layers: the model's decoder layers. retune(config): writes config's MoBA settings onto the
    loaded model, for engines made without params, or None when the runtime cannot be re-tuned.
    device: where the model runs.
    identity: a fingerprint of the loaded weight, config and tokenizer files (agent.cachefs.fingerprint);
    the context cache key includes it, so new weights under the same name never reuse old KV.
    notes: one line each where the run differs from what was asked (stated on stderr and in --json).
    """

    tokenizer: object
    make_engine: Callable[[int], object]
    name: str
    chat: bool
    max_positions: int
    num_layers: int
    stop_ids: frozenset[int] = frozenset()
    retune: Callable[[AskConfig], None] | None = None
    device: str = "cpu"
    identity: str = ""
    notes: tuple[str, ...] = ()


@dataclass
class Answer:
    """One answer: text, generated token ids, stats, and its routing products: citations (data),
    per-file routing strength (`strengths`, pack path -> share, strongest first) and what the gate
    routed to (`routing`)."""

    text: str
    tokens: list[int]
    citations: list[cit.Citation]
    stats: dict
    recorder: RoutingRecorder | None = None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    strengths: dict[str, float] = field(default_factory=dict)
    routing: cit.RoutingCounts | None = None


@dataclass
class Turn:
    question: str
    answer: str


@dataclass
class Session:
    """One packed context, prefilled once, asked many questions.

    mode: "ask" (the ask template), "chat" (plain turns) or "summarize".
    notes: lines already stated about this session (the CLI's window check); answers add their own.
    params: the MoBA settings of `config` for the runtime's model, which its engine runs.
    """

    runtime: Runtime
    pack: object
    config: AskConfig
    mode: str = "ask"
    ctx_cache: object | None = None
    history: list[Turn] = field(default_factory=list)

    def __post_init__(self):
        self.prefix_ids = self._bos() + self._encode(self._split(self._render([], ""))[0])
        self.context_len = len(self.prefix_ids) + len(self.pack.ids)
        self.smap = self.pack.source_map.shifted(len(self.prefix_ids))
        self.params = params_for(self.config, self.runtime.num_layers)
        self.engine = None
        self.head_weights: headweights.HeadWeights | None = None
        self.head_keys = False  # answers' recorders also keep per-head key mass (`moba-ask calibrate`)
        self._pending_save: str | None = None
        self.turn_ids: list[int] = []
        self.notes: list[str] = []
        self.stats: dict = {"context_tokens": self.context_len, "cache_hit": False, "prefill_s": 0.0}

    def capacity(self) -> int:
        """KV cache tokens: the context, the room for turns (1024, 4096 in chat) and the longest answer
        asked (`answer_room` by default), never more than the model's window."""
        answer = self.config.max_new_tokens or answer_room(self.runtime.max_positions)
        turns = 4096 if self.mode == "chat" else 1024
        return min(self.context_len + turns + answer, max(self.runtime.max_positions, self.context_len + 1))

    def answer_limit(self, question: str, used: int) -> int:
        """The longest answer to `question` once `used` tokens fill the cache: `answer_tokens`, cut to
        what is left of the window and the cache."""
        left = min(self.runtime.max_positions, self.capacity()) - used
        return max(1, min(answer_tokens(self.config, self.mode, question), left))

    def turn_length(self, question: str) -> int:
        """Tokens the first turn with `question` adds after the context (prompt frame included)."""
        return len(self._encode(self._split(self._render([], question))[1]))

    def open(self, progress: Callable[[int, int], None] | None = None,
             on_engine: Callable[[object], None] | None = None) -> None:
        """Prefill the context, or load it from the context cache when the key matches.

        on_engine(engine) runs once the engine (and its KV cache size) exists, before any prefill.
        """
        self.engine = self.runtime.make_engine(self.capacity(), self.params)
        self.head_weights = self._load_weights()
        if on_engine:
            on_engine(self.engine)
        t0 = time.perf_counter()
        key = self._cache_key()
        hit = self._load_cached(key)
        if not hit:
            ids = list(self.prefix_ids) + [int(i) for i in self.pack.ids]
            self.engine.prefill(ids, progress, logits=False)
            self._pending_save = key
        self.stats.update(cache_hit=hit, prefill_s=round(time.perf_counter() - t0, 3))

    def ask(self, question: str, on_token: Callable[[str], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> Answer:
        """Answer one question (a chat turn in chat mode). on_token gets text pieces as they come;
        should_stop() returning True ends the answer early (Ctrl-C)."""
        if not question.strip() and self.mode != "summarize":
            raise ValueError("the question is empty: type a question")
        turn = self._encode(self._split(self._render(self.history, question))[1])
        start = self._reuse(turn)
        end = self.context_len + len(turn) + ANSWER_ROUTING_TOKENS
        rec = self._recorder(self.context_len + start, end, answer_start=self.context_len + len(turn))
        with capture_routing(rec), dense_queries():
            t0 = time.perf_counter()
            logits = self.engine.prefill(turn[start:])
            t1 = time.perf_counter()
            limit = self.answer_limit(question, self.engine.length)
            tokens, text, stopped = self._decode(logits, limit, on_token, should_stop)
        decode_s = time.perf_counter() - t1
        self.turn_ids = (turn + tokens)[: self.engine.length - self.context_len]
        self.history.append(Turn(question, text))
        self._save_cached(self._pending_save)  # after the first answer, so it never delays one
        self._pending_save = None
        routing = self._routing_products(rec, text)
        reason = "interrupted" if stopped else getattr(self.engine, "stop_reason", "") or "end"
        stats = dict(self.stats, decode_tok_s=round(len(tokens) / max(decode_s, 1e-9), 2),
                     answer_tokens=len(tokens), question_tokens=len(turn) - start,
                     question_s=round(t1 - t0, 3), answer_limit=limit, stopped=reason)
        notes = _stop_notes(reason, limit, self.config, bool(self.notes)) + self._uncited_note(text)
        return Answer(text, tokens, stats=stats, recorder=rec, interrupted=stopped, notes=notes, **routing)

    def reset(self) -> None:
        """Forget the chat history; the context stays prefilled."""
        self.history.clear()
        self.engine.truncate(self.context_len)
        self.turn_ids = []

    def _decode(self, logits, limit: int, on_token, should_stop):
        tok = self.runtime.tokenizer
        stop_text = None if self.runtime.chat else "\nQuestion:"  # a base model starts the next turn
        tokens: list[int] = []
        shown, ended = "", False

        def step(t: int) -> bool:
            nonlocal shown, ended
            tokens.append(t)
            text, ended = _cut(tok.decode(tokens, skip_special_tokens=True), stop_text)
            visible = text if ended else _hold_back(text, stop_text)
            if on_token and len(visible) > len(shown) and not visible.endswith("\ufffd"):
                on_token(visible[len(shown):])
                shown = visible
            return ended or bool(should_stop and should_stop())

        c = self.config
        sampling = Sampling(limit, c.temperature, c.top_p, repetition_penalty=c.repetition_penalty,
                            repeat_stop=c.repeat_stop)
        self.engine.generate(logits, sampling, self.runtime.stop_ids, step)
        text = _cut(tok.decode(tokens, skip_special_tokens=True), stop_text)[0].rstrip()
        if on_token and len(text) > len(shown):
            on_token(text[len(shown):])
        return tokens, text, bool(should_stop and should_stop())

    def _reuse(self, turn: list[int]) -> int:
        """Crop the cache to the context plus the longest reusable part of the previous turns."""
        common = 0
        limit = min(len(self.turn_ids), len(turn) - 1)
        while common < limit and self.turn_ids[common] == turn[common]:
            common += 1
        self.engine.truncate(self.context_len + common)
        return common

    def _recorder(self, start: int, end: int, answer_start: int) -> RoutingRecorder:
        """A per-head recorder for [start, end), its key mass weighted by the calibrated line heads (the block
        heads where none are calibrated); the answer tokens' own part of it (from answer_start) kept apart as
        its tail mass."""
        hw = self.head_weights
        return RoutingRecorder(start=start, end=end, per_head=True, head_weights=hw and hw.line_matrix(),
                               tail_start=answer_start, head_keys=self.head_keys)

    def cite_selection(self) -> dict:
        """The line selection this session's citations use (`agent.citations.cite_blocks` keywords): the one
        calibrated with the line heads, else the defaults."""
        return {**cit.SELECTION, **(self.head_weights.selection() if self.head_weights else {})}

    def _load_weights(self) -> headweights.HeadWeights | None:
        """The citation weights `config.head_weights` names (the model's shipped ones by default, a note
        on stderr, once, when there are none). Raises SettingError for a named file that does not fit."""
        cfg = self.engine.config
        try:
            hw, note = headweights.chosen(self.config.head_weights, self.runtime.name,
                                          layers=int(getattr(cfg, "num_hidden_layers", 0)),
                                          heads=int(getattr(cfg, "num_attention_heads", 0)),
                                          block_size=self.params.block_size)
        except headweights.WeightsError as e:
            raise SettingError(f"--head-weights: {e}") from None
        headweights.note_once(note)
        self.stats["citation_weights"] = "calibrated" if hw else "uniform"
        return hw

    def _routing_products(self, rec: RoutingRecorder, text: str) -> dict:
        """The answer's citations (routing and text), per-file strengths (the same head weights) and
        routing counts."""
        hw, p = self.head_weights, self.params
        blocks = dict(block_size=p.block_size, sink_blocks=p.sink_blocks)
        kw = dict(blocks, weights=hw and hw.matrix(), signal=hw.signal if hw else "mass")
        routed = cit.from_routing(rec, self.smap, **kw, **self.cite_selection())
        return dict(citations=cit.combine(routed, cit.from_text(text, self.smap)),
                    strengths=cit.file_strengths(rec, self.smap, **kw),
                    routing=cit.routing_counts(rec, self.smap, **blocks))

    def _uncited_note(self, text: str) -> list[str]:
        """For a summary: a note when some of its sections cite no packed lines."""
        if self.mode != "summarize":
            return []
        bare, total = cit.uncited_sections(text, self.smap)
        if not bare:
            return []
        return [f"{bare} of {total} section(s) of the summary cite no lines of the pack; see the routing "
                "citations and the files by routing strength"]

    def _render(self, history: list[Turn], question: str) -> str:
        template = {"ask": "ask", "chat": "chat", "summarize": "summarize"}[self.mode]
        first = history[0].question if history else question
        if not self.runtime.chat:  # a base model: plain completion, no instructions to echo
            return self._completion(history, question, first)
        first_text = self._user_text(template, first)
        messages = [{"role": "system", "content": prompts.load("system")}]
        turns = [*history, Turn(question, "")]
        for i, t in enumerate(turns):
            user = DOCS_MARK + "\n\n" + first_text if i == 0 else self._user_text("chat", t.question)
            messages.append({"role": "user", "content": user})
            if i < len(history):
                messages.append({"role": "assistant", "content": t.answer})
        return self.runtime.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _user_text(self, template: str, question: str) -> str:
        if template == "summarize":
            return prompts.load("summarize").format(focus=question).rstrip()
        return prompts.load(template).format(question=question)

    def _completion(self, history: list[Turn], question: str, first: str) -> str:
        if self.mode == "summarize":
            head = "Summary" + (f" ({first})" if first else "") + " of the files above:"
        else:
            head = f"Question: {first}\nAnswer:"
        parts = [DOCS_MARK + "\n\n" + head]
        for i, t in enumerate(history):
            nxt = history[i + 1].question if i + 1 < len(history) else question
            parts.append(f" {t.answer}\n\nQuestion: {nxt}\nAnswer:")
        return "".join(parts)

    def _bos(self) -> list[int]:
        """A base model's BOS token (chat templates write their own)."""
        bos = getattr(self.runtime.tokenizer, "bos_token_id", None)
        return [bos] if bos is not None and not self.runtime.chat else []

    def _split(self, rendered: str) -> tuple[str, str]:
        before, _, after = rendered.partition(DOCS_MARK)
        return before, after

    def _encode(self, text: str) -> list[int]:
        return list(self.runtime.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _cache_key(self) -> str | None:
        """The context cache key: model identity (name, weight-file fingerprint, tokenizer, YaRN factor), dtype,
        device kind, prefill chunk, the attention choice and every MoBA setting (`params`), the prompt
        prefix, plus the packed content."""
        if self.ctx_cache is None or self.config.no_cache:
            return None
        c, e = self.config, self.engine
        device = str(getattr(e, "device", self.runtime.device))
        model = dict(name=self.runtime.name, weights=self.runtime.identity,
                     tokenizer=tokens.identity(self.runtime.tokenizer))
        if c.rope_yarn != 1:  # only then, so that the entries of unscaled runs keep their keys
            model["rope_yarn"] = c.rope_yarn
        attention = dict(asdict(self.params), kind=c.attention, dense_layers=list(self.params.dense_layers),
                         dtype=str(getattr(e, "dtype", c.dtype)), device=device.split(":")[0],
                         chunk_size=getattr(e, "chunk_size", c.chunk_size), prefix=self.prefix_ids)
        return self.ctx_cache.make_key(model, attention, self.pack.content_hash)

    def _load_cached(self, key: str | None) -> bool:
        """Restore the saved context, all or nothing: on any mismatch the KV cache is left empty and
        the entry is dropped, so the prefill that follows starts clean and saves a good entry."""
        if key is None:
            return False
        got = self.ctx_cache.load(key, device=str(getattr(self.engine, "device", "cpu")))
        if got is None:
            return False
        tensors, meta = got
        if meta.get("tokens") != self.context_len:
            self.ctx_cache.drop(key, f"it holds {meta.get('tokens')} tokens, the context has {self.context_len}")
            return False
        try:
            restored = self.engine.cache.restore(tensors)
        except (KeyError, RuntimeError, ValueError, IndexError) as err:
            restored = f"tensors that do not fit this model ({type(err).__name__})"
        if restored == self.context_len == self.engine.length:
            return True
        self.engine.truncate(0)
        self.ctx_cache.drop(key, f"restored {restored} tokens, the context has {self.context_len}")
        return False

    def _save_cached(self, key: str | None) -> None:
        if key is None or self.engine.length < self.context_len:
            return
        tensors = {k: v.contiguous() for k, v in self.engine.cache.export(self.context_len).items()}
        meta = dict(model=self.runtime.name, root=self.pack.root, tokens=self.context_len)
        self.ctx_cache.save(key, tensors, meta)


def _stop_notes(reason: str, limit: int, config: AskConfig, warned: bool) -> list[str]:
    """A note when the answer was cut: it looped, or it reached its length limit (`warned`: the cut by the
    window was already stated before the run)."""
    if reason == "repetition":
        return ["the answer stopped because it was repeating itself (--repeat-stop 0 lets it run on, "
                "--repetition-penalty above 1.1 steers away sooner)"]
    if reason != "length":
        return []
    asked = config.max_new_tokens
    if asked and asked > limit:
        return [] if warned else [f"the answer stopped at {limit:,} tokens, all the window and cache leave after the "
                                  f"context and question (--max-new-tokens {asked:,}): lower --max-tokens for more"]
    if asked:
        return []
    return [f"the answer stopped at {limit:,} tokens, the default for this kind of question: --max-new-tokens "
            "allows a longer one"]


def _cut(text: str, stop: str | None) -> tuple[str, bool]:
    """text up to `stop` (exclusive) and whether stop was found."""
    i = text.find(stop) if stop else -1
    return (text, False) if i < 0 else (text[:i], True)


def _hold_back(text: str, stop: str | None) -> str:
    """text without a tail that could be the start of `stop` (so it is never streamed)."""
    if stop:
        for n in range(min(len(stop), len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                return text[:-n]
    return text
