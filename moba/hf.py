"""transformers plug-in: `attn_implementation="moba"` for Llama, Qwen2, Mistral and Gemma3 models.

`import moba` registers an attention function and a mask function under the name "moba".
MoBA parameters are read from the model config at every call (`moba_params`), so a loaded model
can be re-tuned without reloading. The attention function sees transformers' [B, H, T, D]
tensors; the queries are the last Tq of the Tk keys the cache hands over, so it needs a cache
that passes only its filled part (agent's MobaCache does; DynamicCache does too).

What runs where:
- a layer with a sliding window (Gemma3 local layers) keeps its window, computed densely;
- layers in `moba_dense_layers`, and every layer inside `dense_queries()` when the question and
  answer policy is "dense", use exact causal attention: SDPA, except a single query on a GPU (a
  decode step), which moba/static.py's dense decode spreads over slices of the keys;
- all other layers run `moba.moba_attention`, with cached block means when the cache attaches
  them to the key tensor (moba/cachekeys.py).
Batches with padding get a real mask from transformers and fall back to dense SDPA.
Inside `unread_outputs(layers)` those layers compute no attention (their output is zeros): the caller
reads nothing they output at these positions and keeps only the keys and values the attention module
wrote to the cache before calling here (a context that only fills the cache: the last layer's output
there feeds nothing). A layer the active recorder wants is computed anyway.
Sharded heads (tensor parallel): the function sees only the heads of its process; an attention module
whose `moba_head_offset` attribute is set reads the citation head weights of its own heads from there.
Static decode (CUDA graphs): when the key tensor carries a static length (`cachekeys.static_of`) the
cache handed over its whole buffers; the one query sits at length - 1 and moba/static.py attends
with the same per-layer choices (window, dense, MoBA over the block sums), without recording routing.
Knows nothing of files or prompts.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moba.cachekeys import block_means_of, static_of
from moba.capture import active_recorder
from moba.ops import dense_attention, moba_attention, moba_routing
from moba.static import static_dense_decode, static_moba_decode, static_sliding_decode

NAME = "moba"
HEAD_OFFSET = "moba_head_offset"  # attention-module attribute: its first query head's global index when sharded
_FORCE_DENSE: ContextVar[bool] = ContextVar("moba_force_dense", default=False)
_UNREAD: ContextVar[frozenset[int]] = ContextVar("moba_unread_layers", default=frozenset())
QA_POLICIES = ("moba", "dense")


@dataclass(frozen=True)
class MobaParams:
    """The MoBA settings of one run: the one place their defaults are written and checked.

    Defaults suit pretrained models never trained with MoBA: small blocks route well, and the
    first block is kept as an attention sink (see moba/README.md and bench/RESULTS.md).
    block_size, top_k, sink_blocks, local_blocks, gate_subblocks: the arguments of
        `moba.moba_attention` (`op_kwargs`).
    dense_layers: layer indices that stay dense; negative counts from the end (-1 = last).
    qa_policy: "dense" (exact attention for the tokens run inside `dense_queries()`, the question
        and answer) or "moba".
    Raises ValueError, naming the setting and the values it takes, for settings no run can use.
    """

    block_size: int = 256
    top_k: int = 6
    sink_blocks: int = 1
    dense_layers: tuple[int, ...] = ()
    qa_policy: str = "dense"
    local_blocks: int = 0
    gate_subblocks: int = 1

    def __post_init__(self):
        if self.qa_policy not in QA_POLICIES:
            raise ValueError(f"qa_policy must be one of {', '.join(QA_POLICIES)}, got {self.qa_policy!r}")
        if self.block_size < 1 or self.top_k < 1 or self.sink_blocks < 0:
            raise ValueError("block size and top-k must be >= 1 and sink blocks >= 0")
        if not 0 <= self.local_blocks < self.top_k:
            raise ValueError(f"local blocks must be >= 0 and below top-k ({self.top_k}): they take routed slots")
        if self.gate_subblocks < 1 or self.block_size % self.gate_subblocks:
            raise ValueError(f"gate sub-blocks must be >= 1 and divide the block size ({self.block_size})")

    def op_kwargs(self) -> dict:
        """The keyword arguments of `moba.moba_attention` these settings fix."""
        return dict(block_size=self.block_size, top_k=self.top_k, sink_blocks=self.sink_blocks,
                    local_blocks=self.local_blocks, gate_subblocks=self.gate_subblocks)


def moba_params(config) -> MobaParams:
    """The MobaParams of a transformers config (missing attributes take the defaults)."""
    d = MobaParams()
    return MobaParams(
        block_size=int(getattr(config, "moba_block_size", None) or d.block_size),
        top_k=int(getattr(config, "moba_top_k", None) or d.top_k),
        sink_blocks=int(getattr(config, "moba_sink_blocks", d.sink_blocks)),
        dense_layers=tuple(getattr(config, "moba_dense_layers", None) or ()),
        qa_policy=str(getattr(config, "moba_qa_policy", None) or d.qa_policy),
        local_blocks=int(getattr(config, "moba_local_blocks", None) or d.local_blocks),
        gate_subblocks=int(getattr(config, "moba_gate_subblocks", None) or d.gate_subblocks),
    )


def configure(config, params: MobaParams) -> None:
    """Write `params` onto a transformers config (and its text sub-config, if any)."""
    for cfg in {id(config): config, id(_text_config(config)): _text_config(config)}.values():
        cfg.moba_block_size = params.block_size
        cfg.moba_top_k = params.top_k
        cfg.moba_sink_blocks = params.sink_blocks
        cfg.moba_dense_layers = list(params.dense_layers)
        cfg.moba_qa_policy = params.qa_policy
        cfg.moba_local_blocks = params.local_blocks
        cfg.moba_gate_subblocks = params.gate_subblocks


@contextlib.contextmanager
def dense_queries(enabled: bool = True):
    """Inside the block, MoBA layers compute dense attention when enabled (question/answer policy)."""
    token = _FORCE_DENSE.set(enabled)
    try:
        yield
    finally:
        _FORCE_DENSE.reset(token)


@contextlib.contextmanager
def unread_outputs(layers):
    """Inside the block, the attention of `layers` (indices; negative counts from the end) is not
    computed and returns zeros: for outputs the caller never reads (see the module docstring)."""
    token = _UNREAD.set(frozenset(layers))
    try:
        yield
    finally:
        _UNREAD.reset(token)


def _unread(module, query, key) -> bool:
    layers = _UNREAD.get()
    if not layers or not _layer_in(module, layers):
        return False
    rec = active_recorder()
    return rec is None or not rec.wants(getattr(module, "layer_idx", 0), key.shape[2] - query.shape[2], key.shape[2])


def moba_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls: [B, H, T, D] in, ([B, Tq, Hq, D], None) out."""
    if _unread(module, query, key):
        B, Hq, Tq, _ = query.shape
        return value.new_zeros(B, Tq, Hq, value.shape[-1]), None
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    static = static_of(key)
    if static is not None:
        out = _static(module, query, key, value, attention_mask, static, window, scaling)
    elif attention_mask is not None:
        out = _masked(query, key, value, attention_mask, scaling)
    elif window:
        out = _sliding(query, key, value, int(window), scaling)
    else:
        out = _moba_or_dense(module, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def forced_dense(params: MobaParams) -> bool:
    """True inside `dense_queries()` when the question/answer policy of `params` is "dense"."""
    return _FORCE_DENSE.get() and params.qa_policy == "dense"


def _is_dense(module, p: MobaParams) -> bool:
    return _layer_in(module, p.dense_layers) or forced_dense(p)


def _layer_in(module, layers) -> bool:
    """True when the module's layer is one of `layers` (indices; negative counts from the end)."""
    layer = getattr(module, "layer_idx", 0)
    n_layers = getattr(module.config, "num_hidden_layers", layer + 1)
    return layer in {i % n_layers for i in layers}


def _static(module, query, key, value, attention_mask, static, window, scaling):
    if attention_mask is not None or query.shape[2] != 1:
        raise ValueError("static decode takes one query and no padding mask")
    if window:
        return static_sliding_decode(query, key, value, static.length, int(window), scale=scaling)
    p = moba_params(module.config)
    if _is_dense(module, p):
        return static_dense_decode(query, key, value, static.length, scale=scaling)
    return static_moba_decode(query, key, value, static.length, static.block_sums, scale=scaling, **p.op_kwargs())


def _moba_or_dense(module, query, key, value, scaling):
    p = moba_params(module.config)
    layer = getattr(module, "layer_idx", 0)
    dense = _is_dense(module, p)
    rec = active_recorder()
    q_start = key.shape[2] - query.shape[2]
    want = rec is not None and rec.wants(layer, q_start, key.shape[2])
    kw = p.op_kwargs()
    means = block_means_of(key)
    if dense:
        out = _dense(query, key, value, scaling)
        routing = moba_routing(query, key, key_means=means, **kw) if want else None
    elif want:
        out, routing = moba_attention(query, key, value, scale=scaling, return_routing=True, key_means=means, **kw)
    else:
        return moba_attention(query, key, value, scale=scaling, key_means=means, **kw)
    if want:
        _record(module, rec, layer, q_start, routing, query, key, p.block_size, scaling, dense)
    return out


def _dense(query, key, value, scaling):
    """Exact causal attention; on a GPU one query (a decode step) goes through `static_dense_decode`, which
    spreads it over slices of the keys, where SDPA runs a few programs per head through the whole cache."""
    if query.shape[2] == 1 and query.is_cuda:
        length = torch.full((1,), key.shape[2], dtype=torch.long, device=query.device)  # a fill, no host copy
        return static_dense_decode(query, key, value, length, scale=scaling)
    return dense_attention(query, key, value, scale=scaling)


def _record(module, rec, layer, q_start, routing, query, key, block_size, scaling, dense) -> None:
    """Store the routing of the recorded queries and hand them to the recorder, whose `finish` adds the
    attention mass this layer computed (dense: over all past keys; MoBA: over the attended keys)."""
    sl = rec.record(layer, q_start, routing, dense=dense)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    positions = torch.arange(q_start + sl.start, q_start + sl.stop, device=query.device)
    blocks = None if dense else routing.blocks[0, :, sl]
    rec.defer(layer, query[0, :, sl], positions, key[0], block_means_of(key), blocks,
              block_size=block_size, scale=scale, head_offset=getattr(module, HEAD_OFFSET, 0))


def _sliding(query, key, value, window, scaling):
    """Causal attention over the last `window` positions (key > p - window), as transformers does."""
    Tq, Tk = query.shape[2], key.shape[2]
    lo = max(0, Tk - Tq - window + 1)
    qp = torch.arange(Tk - Tq, Tk, device=query.device)[:, None]
    kp = torch.arange(lo, Tk, device=query.device)[None, :]
    mask = (kp <= qp) & (kp > qp - window)
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(
        query, key[:, :, lo:], value[:, :, lo:], attn_mask=mask, scale=scaling, enable_gqa=gqa
    )


def _masked(query, key, value, mask, scaling):
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    gqa = query.shape[1] != key.shape[1]
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa)


def moba_mask(*args, attention_mask=None, **kwargs):
    """Mask function for "moba": None without padding (the attention function applies causality
    and sliding windows itself, so no [Tq, Tk] mask is built), else transformers' SDPA mask."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Register "moba" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, moba_attention_forward)
    AttentionMaskInterface.register(NAME, moba_mask)


def _text_config(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config
