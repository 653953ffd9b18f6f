"""The run configuration of moba-ask: one frozen dataclass whose fields map one-to-one onto the
common CLI flags, and the rules that make its defaults concrete for a run (`settle`, `params_for`).

The MoBA settings' defaults and checks live in `moba.hf.MobaParams`; AskConfig's MoBA fields take
their defaults from it and `params_for` turns them back into the MobaParams the engine, the session
and the citations use. Knows nothing of models or files beyond names and numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from moba.hf import MobaParams

ATTENTION = ("auto", "moba", "dense")
AUTO_DENSE_FACTOR = 8  # "auto" is dense below AUTO_DENSE_FACTOR x top_k x block_size context tokens
MAX_ROPE_YARN = 64  # YaRN factors past this stretch a window beyond any context this tool can hold
AUTO_DENSE_TOKENS = {"cpu": 32_768, "cuda": 65_536}  # and below this many at least, per device (`auto_threshold`)
DENSE_LAYERS_CPU = (-3, -2, -1)  # the CPU default (bench/RESULTS.md, evaluation); none on CUDA
RESERVE = 512  # tokens the default context budget keeps beside the pack for the prompt frame and the question
ANSWER_ROOM = 1024  # tokens the default context budget keeps for the answer, whatever --max-new-tokens says
MIN_ANSWER_ROOM = 32  # a question must leave the answer at least this many tokens of the window
ANSWER_TOKENS = {"short": 256, "explain": 512, "summarize": 1024}  # default answer length by question type
_EXPLAIN = re.compile(r"\s*(how|why|explain|describe|compare|walk|outline|list|summari[sz]e|what happens|"
                      r"what are the steps)\b", re.IGNORECASE)


class SettingError(ValueError):
    """A setting that is malformed, or that the loaded model or this machine cannot honour. One line
    naming the fix."""


@dataclass(frozen=True)
class AskConfig:
    """Settings shared by ask, chat, summarize and eval.

    model: catalog name, hub id, directory or .gguf (None: $MOBA_ASK_MODEL or the device default).
    attention: "moba" (sparse), "dense" (exact SDPA; routing is still scored for citations) or "auto"
        (dense for contexts under `auto_threshold`, else moba; made concrete by `settle`).
    block_size, top_k, sink_blocks, qa_policy, local_blocks, gate_subblocks: the MoBA settings, with
        MobaParams' defaults and checks (moba/hf.py; moba/README.md). qa_policy "dense", the default,
        keeps the question and answer tokens exact: a few hundred tokens, and the held-out
        evaluation answered 0.70 with it against 0.52 with "moba" (bench/RESULTS.md).
    dense_layers: layers that stay dense; negative indices count from the end. None: the device's
        default, DENSE_LAYERS_CPU (the last 3) on CPU and none on CUDA, where a dense layer at 1M
        tokens costs ~16 s of attention (made concrete by `settle`).
    head_weights: citation head weights: None for the model's shipped file (every head alike, with a
        note, when it has none), "uniform" for every head alike, else a weights file written by
        `moba-ask calibrate` (a file that cannot be used is an error, not a fallback).
    max_tokens: context budget; files are dropped by priority to fit (0: the model's limit).
    max_new_tokens: the longest answer (None: by question type, `answer_tokens`).
    temperature, top_p: sampling.
    repetition_penalty: divides the logits of the answer's recent tokens (1: off; agent.engine.Sampling).
    repeat_stop: stop when the answer's tail is this many copies of one phrase (0: never).
    no_cache: do not read or write the context cache.
    device: "cpu", "cuda", "cuda:1"... (None: cuda when available).
    chunk_size: prefill chunk (None: 1024 on CPU, 16384 on CUDA).
    dtype: "float32", "bfloat16", "float16": full-precision weights (None: int8 weight-only on CPU with bf16
        or fp32 activations, `agent.quant`; bf16 on CUDA).
    rope_yarn: YaRN rope scaling factor (1: off): the model's rope becomes YaRN and its window this many
        times the trained one (`agent.rope`); answers change, at every context length.
    """

    model: str | None = None
    attention: str = "auto"
    block_size: int = MobaParams.block_size
    top_k: int = MobaParams.top_k
    sink_blocks: int = MobaParams.sink_blocks
    dense_layers: tuple[int, ...] | None = None
    qa_policy: str = MobaParams.qa_policy
    local_blocks: int = MobaParams.local_blocks
    gate_subblocks: int = MobaParams.gate_subblocks
    head_weights: str | None = None
    max_tokens: int = 0
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    repeat_stop: int = 3
    no_cache: bool = False
    device: str | None = None
    chunk_size: int | None = None
    dtype: str | None = None
    rope_yarn: float = 1.0

    def __post_init__(self):
        if self.attention not in ATTENTION:
            raise SettingError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")
        params_for(self, 0)  # MobaParams' checks, as SettingError
        if self.max_tokens < 0 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise SettingError("max tokens must be >= 0 and max new tokens >= 1")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise SettingError(f"--temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.repetition_penalty < 1 or self.repeat_stop < 0:
            raise SettingError("repetition penalty must be >= 1 (1 is off) and repeat stop >= 0 (0 is off)")
        if not (math.isfinite(self.rope_yarn) and 1 <= self.rope_yarn <= MAX_ROPE_YARN):
            raise SettingError(f"--rope-yarn must be a finite factor >= 1 and <= {MAX_ROPE_YARN} (1 is off; 4 takes a "
                               f"32,768-token window to 131,072), got {self.rope_yarn}")


def params_for(config: AskConfig, num_layers: int) -> MobaParams:
    """The MoBA settings of `config` for a model of `num_layers` layers: attention "dense" makes every
    layer dense (routing is still scored); "auto" counts as "moba", and dense_layers None as none,
    until `settle` makes them concrete for the packed context.

    Raises SettingError for MoBA settings MobaParams refuses.
    """
    dense = tuple(range(num_layers)) if config.attention == "dense" else config.dense_layers or ()
    try:
        return MobaParams(config.block_size, config.top_k, config.sink_blocks, dense, config.qa_policy,
                          config.local_blocks, config.gate_subblocks)
    except ValueError as e:
        raise SettingError(str(e)) from None


def answer_room(window: int) -> int:
    """Tokens the default context budget keeps for the answer in a window of `window` positions:
    ANSWER_ROOM, or a quarter of a small window. It never depends on --max-new-tokens, so the pack,
    and with it the context cache key, stays the same whatever the answer length."""
    return min(ANSWER_ROOM, window // 4)


def answer_tokens(config: AskConfig, mode: str, question: str) -> int:
    """The longest answer for `question`: config.max_new_tokens when given, else by question type
    (ANSWER_TOKENS): "summarize" for a summary, "explain" for how/why/explain... questions and long
    ones (over 40 words), "short" for the rest (what/where/which...)."""
    if config.max_new_tokens:
        return config.max_new_tokens
    if mode == "summarize":
        return ANSWER_TOKENS["summarize"]
    explain = _EXPLAIN.match(question) or len(question.split()) > 40
    return ANSWER_TOKENS["explain" if explain else "short"]


def auto_threshold(config: AskConfig, device: str) -> int:
    """Context tokens from which "auto" uses MoBA on `device`: the larger of two rules.

    AUTO_DENSE_FACTOR x top_k x block_size: below it a query would attend more than an eighth of the
    context anyway. The device's floor (`auto_floor`), under which exact attention answered better and
    costs little or nothing (bench/RESULTS.md, twelfth and thirteenth sessions):
    - CPU, 32,768: on a 2-core CPU the CPU default (MoBA, last 3 layers dense) kept 0.84 of dense's correct
      answers at 16K (60 tasks) and prefilled slower than dense: 15K tokens in 189 against 138 s, 30K in
      435 against 390 s.
    - CUDA, 65,536: on the H200 MoBA kept 0.82 [0.71, 0.94] of dense's answers at 16K (245 tasks), 0.92
      [0.83, 1.02] at 30K (449) and 0.72 [0.57, 0.90] at 64K (YaRN x4, 167 tasks); exact attention cost
      a 26K context nothing and a 64K one ~0.6 s more (median 1.16 against 0.56 s over 11 packs). At 128K
      MoBA prefilled 3x faster (4.5 against 13.8 s).
    """
    return max(AUTO_DENSE_FACTOR * config.top_k * config.block_size, auto_floor(device))


def auto_floor(device: str) -> int:
    """The device's AUTO_DENSE_TOKENS: "cuda" for any CUDA device, else "cpu"."""
    return AUTO_DENSE_TOKENS["cuda" if device.startswith("cuda") else "cpu"]


def settle(config: AskConfig, context_tokens: int, device: str) -> AskConfig:
    """config with its defaults made concrete for a context of that many tokens on `device`:
    attention "auto" becomes "dense" or "moba" (`auto_threshold`), dense_layers None the device's."""
    if config.dense_layers is None:
        config = replace(config, dense_layers=() if device.startswith("cuda") else DENSE_LAYERS_CPU)
    if config.attention != "auto":
        return config
    return replace(config, attention="moba" if context_tokens >= auto_threshold(config, device) else "dense")


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """"-3,-2,-1", "last3", "first2" or a mix ("first2,last2") -> layer indices (firstN: 0..N-1, lastN:
    -N..-1); "none" or "" -> (); None -> None (the device default).

    Raises:
        SettingError: naming the forms accepted.
    """
    if text is None:
        return None
    text = text.strip()
    if not text or text == "none":
        return ()
    out: list[int] = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        out += _layer_item(item, text)
    return tuple(dict.fromkeys(out))


def _layer_item(item: str, text: str) -> list[int]:
    m = re.fullmatch(r"(first|last)(\d*)", item)
    if m:
        n = int(m.group(2) or 1)
        return list(range(n)) if m.group(1) == "first" else list(range(-n, 0))
    try:
        return [int(item)]
    except ValueError:
        raise SettingError("dense layers must be comma-separated integers or lastN/firstN ('0,5,-1', 'last3', "
                         f"'first2,last2'), or 'none'; got {text!r}") from None


def check_layers(layers: tuple[int, ...], num_layers: int) -> None:
    """Raise SettingError when a dense layer index is outside a model of `num_layers` layers."""
    bad = [i for i in layers if not -num_layers <= i < num_layers]
    if bad:
        raise SettingError(f"dense layer(s) {', '.join(map(str, bad))} outside the model's {num_layers} layers: "
                         f"use indices {-num_layers}..{num_layers - 1}")
