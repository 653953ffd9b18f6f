"""The inference engine: chunked prefill into a MobaCache, sparse decode, sampling, streaming.

Works on token ids only; knows nothing of files, prompts or citations. The model is any
transformers causal LM; with `attn_implementation="moba"` its attention reads the MoBA settings
from the model config, which the engine writes from the MobaParams it is given (`Engine.params`),
and block means from the cache. Only the last position's logits are computed; a prefill whose logits
nobody reads (`prefill(..., logits=False)`, a context that only fills the cache) also skips the last
layer's attention and MLP, whose outputs there feed nothing: the cache is the same, bit for bit.

Decode paths (`Engine.decode`): "dynamic" runs the model on the cache's filled part, token by token
(launch- and Python-bound on a GPU); "static" runs agent/decoder.py's static-shape step eagerly;
"graph" replays that step as a CUDA graph. "auto" (the default) is "graph" for a CUDA model with
attn_implementation "moba", else "dynamic". Any path falls back to "dynamic" for a token while
routing capture records the token's position, or before the cache holds its buffers. Under the dense
question/answer policy the static step attends every key in every layer (its own captured graph).
All paths give the same tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from agent.decoder import StaticDecoder
from agent.kvcache import MobaCache, kv_bytes
from moba.capture import active_recorder
from moba.hf import MobaParams, configure, forced_dense, moba_params, unread_outputs

DECODE_PATHS = ("auto", "dynamic", "static", "graph")
PENALTY_WINDOW = 64  # the repetition penalty weighs the answer's last this many tokens (llama.cpp's default)
REPEAT_CHECK_EVERY = 8  # tokens between two looks for a repeating tail (on the host, never in the step)
REPEAT_MIN_SPAN = 32  # a repeating tail counts once its copies cover this many tokens
REPEAT_MAX_PERIOD = 64  # the longest repeated phrase looked for, in tokens


class MemoryBudgetError(Exception):
    """The KV cache would not fit in the memory free on the device. One line naming the fix."""


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. temperature 0 is greedy; top_p applies when temperature > 0.

    repetition_penalty: logits of tokens among the answer's last PENALTY_WINDOW are divided by it
        (multiplied when negative), as in CTRL; 1 is off. Only answer tokens count, never the context.
    repeat_stop: stop once the answer's tail is this many copies in a row of one phrase (covering at
        least REPEAT_MIN_SPAN tokens); 0 never stops.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int | None = None
    repetition_penalty: float = 1.0
    repeat_stop: int = 0


def default_chunk_size(device: torch.device | str) -> int:
    """Prefill chunk: 16384 tokens on CUDA (the size bench/model_gpu.py measures), 1024 on CPU;
    MLP activations stay bounded by the chunk."""
    return 16384 if torch.device(device).type == "cuda" else 1024


class Engine:
    """Prefill, decode and crop over one preallocated cache.

    Args:
        model: a transformers causal LM in eval mode.
        capacity: the most tokens the cache holds (context + question + answer).
        chunk_size: prefill chunk; None picks `default_chunk_size` for the model's device.
        decode: one of DECODE_PATHS (module docstring); default "auto".
        params: the MoBA settings to run, written onto the model's config (see `params`); None
            takes those the config carries (`moba.hf.moba_params`). The cache's blocks are theirs.
    Raises:
        ValueError: an unknown decode path, "static"/"graph" without attn_implementation "moba",
            or "graph" off CUDA.
    """

    def __init__(self, model, capacity: int, chunk_size: int | None = None, decode: str = "auto",
                 params: MobaParams | None = None):
        self.model = model
        self.config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.chunk_size = chunk_size or default_chunk_size(self.device)
        self._params = params or moba_params(self.config)
        self.kv_heads = self.config.num_key_value_heads  # KV heads this process holds (agent.parallel shards them)
        if params is not None:
            configure(model.config, params)
        self.cache = MobaCache(self.config.num_hidden_layers, capacity, self._params.block_size)
        self._cache_kw = _cache_argument(model)
        self.last_logits: torch.Tensor | None = None
        self._decoder: StaticDecoder | None = None
        self.decode = decode
        self.stop_reason = ""

    @property
    def decode(self) -> str:
        """The decode path chosen: "dynamic", "static" or "graph" ("auto" reads back as its choice).
        Settable between calls; raises ValueError as the constructor does."""
        return self._decode

    @decode.setter
    def decode(self, path: str) -> None:
        if path not in DECODE_PATHS:
            raise ValueError(f"unknown decode path {path!r}; choose one of {', '.join(DECODE_PATHS)}")
        moba = getattr(self.model.config, "_attn_implementation", None) == "moba"
        if path in ("static", "graph") and not moba:
            raise ValueError(f'decode="{path}" needs attn_implementation="moba"')
        if path == "graph" and self.device.type != "cuda":
            raise ValueError(f'decode="graph" needs a CUDA model; this one is on {self.device}')
        if path == "auto":
            path = "graph" if moba and self.device.type == "cuda" else "dynamic"
        self._decode = path
        self._decoder = None

    @property
    def params(self) -> MobaParams:
        """The MoBA settings the engine runs. Settable between calls: the model's config takes them
        (another engine on the same model runs them too, its `params` unchanged: one engine per model
        at a time) and a captured decode step is captured again. Raises ValueError for another block
        size: the cache's blocks are fixed."""
        return self._params

    @params.setter
    def params(self, params: MobaParams) -> None:
        if params.block_size != self.cache.block_size:
            raise ValueError(f"this engine's cache uses blocks of {self.cache.block_size} tokens, not "
                             f"{params.block_size}: make a new Engine for another block size")
        configure(self.model.config, params)
        self._params = params

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return self.cache.get_seq_length()

    def kv_bytes(self, tokens: int | None = None) -> int:
        """KV memory for `tokens` (default: the capacity) in the model's dtype."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n = self.cache.capacity if tokens is None else tokens
        return kv_bytes(c.num_hidden_layers, self.kv_heads, head_dim, n, next(self.model.parameters()).dtype)

    @torch.no_grad()
    def prefill(self, ids: Sequence[int], progress: Callable[[int, int], None] | None = None,
                logits: bool = True) -> torch.Tensor | None:
        """Append `ids` to the cache in chunks; return the fp32 logits [V] after the last one, or None
        when `logits` is False (then the last layer only writes its keys and values: `_cache_only`).

        progress(done, total) is called after every chunk.
        """
        ids = torch.as_tensor(list(ids), dtype=torch.long)
        with contextlib.nullcontext() if logits else _cache_only(self.model):
            for start in range(0, len(ids), self.chunk_size):
                self.last_logits = self._forward(ids[start : start + self.chunk_size])
                if progress:
                    progress(min(start + self.chunk_size, len(ids)), len(ids))
        if not logits:
            self.last_logits = None
        return self.last_logits

    def truncate(self, n: int) -> None:
        """Crop the cache back to its first n tokens (for the next chat turn)."""
        self.cache.truncate(n)
        self.last_logits = None

    @torch.no_grad()
    def generate(
        self,
        logits: torch.Tensor,
        sampling: Sampling,
        stop_ids: set[int] = frozenset(),
        on_token: Callable[[int], bool | None] | None = None,
    ) -> list[int]:
        """Decode from `logits` (the prefill's last logits). Stops at a stop id, max_new_tokens,
        when on_token(token) returns True, or when the answer repeats itself (`Sampling.repeat_stop`).
        Stop ids are not returned and not fed back. `stop_reason` then says which: "end", "length",
        "callback" or "repetition"."""
        gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        guard = RepetitionGuard(sampling.repetition_penalty, sampling.repeat_stop)
        out: list[int] = []
        self.stop_reason = "length"
        for _ in range(sampling.max_new_tokens):
            tok = self.pick(guard.penalize(logits), sampling, gen)
            if tok in stop_ids:
                self.stop_reason = "end"
                break
            out.append(tok)
            if on_token and on_token(tok):
                self.stop_reason = "callback"
                break
            if guard.loops(tok, out):
                self.stop_reason = "repetition"
                break
            logits = self.step(tok)
        return out

    def pick(self, logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
        """The next token from `logits` (`sample`); agent.parallel's engine broadcasts rank 0's."""
        return sample(logits, sampling, gen)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Append one token; return the fp32 logits [V] after it, through the decode path in force
        (`decode_path`). A static or graph step returns a buffer that the next step overwrites.
        Raises CacheFullError when the cache is full."""
        if self.decode_path == "dynamic":
            return self._forward(torch.tensor([token]))
        if self._decoder is None:
            self._decoder = StaticDecoder(self.model, self.cache, self._cache_kw, graph=self.decode == "graph")
        return self._decoder.step(token, self._params, forced_dense(self._params))

    @property
    def decode_path(self) -> str:
        """The path the next `step` takes: `decode`, or "dynamic" where the module docstring says."""
        rec = active_recorder()
        if self.decode == "dynamic" or (rec is not None and rec.overlaps(self.length, self.length + 1)):
            return "dynamic"
        return self.decode if self.cache.is_allocated else "dynamic"

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = self.length
        pos = torch.arange(start, start + len(ids), device=self.device)[None]
        kwargs = {self._cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1}
        out = self.model(input_ids=ids.to(self.device)[None], position_ids=pos, **kwargs)
        return out.logits[0, -1].float()


SKIP_MLP_MODELS = ("llama", "qwen2", "gemma3_text")  # decoder layers that call `mlp(x)` for one tensor (tested)


class _Zeros(torch.nn.Module):
    """Stands in for a decoder layer's MLP whose output nothing reads: zeros shaped like its input."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(x)


@contextlib.contextmanager
def _cache_only(model):
    """Inside the block the last decoder layer computes only what the cache needs (its keys and values):
    no attention (`moba.hf.unread_outputs`) and, for the model types of SKIP_MLP_MODELS, no MLP. Its output
    is then wrong, which is right only where nothing reads it: the logits of a prefill that returns none."""
    last = model.get_decoder().layers[-1] if getattr(model.config, "model_type", "") in SKIP_MLP_MODELS else None
    mlp = last.mlp if last is not None else None
    if last is not None:
        last.mlp = _Zeros()
    try:
        with unread_outputs([-1]):
            yield
    finally:
        if last is not None:
            last.mlp = mlp


def cache_bytes(engine) -> int:
    """Bytes the engine's cache takes once allocated: K and V (`Engine.kv_bytes`) plus the fp32 block
    sums, layers x KV heads (this process's) x ceil(capacity / block size) x head dim x 4 B."""
    c = engine.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    blocks = -(-engine.cache.capacity // engine.cache.block_size)
    return engine.kv_bytes() + c.num_hidden_layers * engine.kv_heads * blocks * head_dim * 4


def free_bytes(device: torch.device | str) -> int:
    """Memory free for new tensors: torch.cuda.mem_get_info on CUDA, else MemAvailable (psutil, or
    /proc/meminfo without it)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    return psutil.virtual_memory().available


def check_memory(engine) -> None:
    """Raise MemoryBudgetError before prefill when the engine's cache (`cache_bytes`) exceeds the
    memory free on its device; the model's weights are already loaded, so they are not counted."""
    need, device = cache_bytes(engine), getattr(engine, "device", "cpu")
    free = free_bytes(device)
    if need > free:
        raise MemoryBudgetError(
            f"the KV cache for {engine.cache.capacity:,} tokens needs {need / 2**30:,.1f} GiB but "
            f"{torch.device(device).type} has {free / 2**30:,.1f} GiB free: lower --max-tokens (or "
            "--max-new-tokens), or use a smaller model")


def sample(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None = None) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top_p) sampling on CPU."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float().cpu()
    scaled = (logits - logits.max()) / sampling.temperature  # a temperature that underflows fp32: 0/0 at the max
    probs = torch.softmax(scaled.nan_to_num(nan=0.0), -1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < sampling.top_p
    sorted_p = sorted_p * keep
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])


class RepetitionGuard:
    """The repetition penalty and the loop stop of one answer.

    The penalty keeps a bool mask [V] on the logits' device, set for the tokens among the last
    PENALTY_WINDOW; the host keeps their counts. Marking a token writes one element, so nothing here
    waits for the device. The loop stop compares token ids on the host every REPEAT_CHECK_EVERY tokens.
    """

    def __init__(self, penalty: float, copies: int):
        self.penalty, self.copies = penalty, copies
        self.mask: torch.Tensor | None = None
        self.recent: deque[int] = deque()
        self.counts: Counter[int] = Counter()
        self.period = 0

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        if self.penalty == 1.0:
            return logits
        if self.mask is None:
            self.mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            return logits
        scaled = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(self.mask, scaled, logits)

    def loops(self, token: int, out: list[int]) -> bool:
        """Record `token` (the last of `out`); True when `out` ends in a loop (`period` is its phrase length)."""
        if self.mask is not None:
            self._remember(token)
        if self.copies and len(out) % REPEAT_CHECK_EVERY == 0:
            self.period = repeating_tail(out, self.copies)
        return self.period > 0

    def _remember(self, token: int) -> None:
        self.recent.append(token)
        self.counts[token] += 1
        if self.counts[token] == 1:
            self.mask[token] = True
        if len(self.recent) > PENALTY_WINDOW:
            old = self.recent.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
                self.mask[old] = False


def repeating_tail(tokens: list[int], copies: int, min_span: int = REPEAT_MIN_SPAN,
                   max_period: int = REPEAT_MAX_PERIOD) -> int:
    """The length of the shortest phrase whose copies end `tokens`, at least `copies` of them in a row
    and at least `min_span` tokens in all; 0 when there is none."""
    for period in range(1, max_period + 1):
        n = max(copies, -(-min_span // period))
        if n * period <= len(tokens) and tokens[-n * period:] == tokens[-period:] * n:
            return period
    return 0


def _cache_argument(model) -> str:
    """transformers >= 5.24 calls the cache argument `cache`; earlier 5.x `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params:
        return "cache"
    inner = getattr(model, "model", None)
    if inner is not None and "cache" in inspect.signature(inner.forward).parameters:
        return "cache"
    return "past_key_values"


class Timer:
    """Wall-clock seconds since creation (`elapsed`)."""

    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
