"""One-token decode steps with static shapes over a MobaCache, run eagerly or replayed as a CUDA graph.

A step reads only tensors that live as long as the decoder: the token id and its position (int64
[1, 1] each, written before the step), the cache's preallocated buffers (static mode, see
agent/kvcache.py) and the model's weights; it writes the logits into a tensor it keeps. So the
step can be captured once and replayed for every token, whatever the cache length, after
`truncate` or a further prefill too. Capture happens after `warmup` eager steps (Triton compiles
its kernels on first use); a change of the MoBA settings each step is given (the ones the model's
config carries, and whether the question/answer policy makes every layer dense), which the capture
bakes in, re-captures. Needs a model with attn_implementation
"moba" (the attention function must take whole buffers). Knows nothing of sampling, stop ids or prompts.
"""

from __future__ import annotations

import torch

from agent.kvcache import MobaCache
from moba.hf import MobaParams


class StaticDecoder:
    """Static-shape decode steps over `cache` for `model`.

    Args:
        model: a transformers causal LM with attn_implementation "moba", in eval mode.
        cache: the MobaCache the model decodes into; its buffers must be allocated.
        cache_kw: the name of the forward's cache argument ("cache" or "past_key_values").
        graph: capture the step as a CUDA graph (CUDA only); False runs every step eagerly.
        warmup: eager steps before the capture. Default 2.
    Raises:
        ValueError: graph=True for a model that is not on CUDA.
    """

    def __init__(self, model, cache: MobaCache, cache_kw: str, *, graph: bool, warmup: int = 2):
        device = next(model.parameters()).device
        if graph and device.type != "cuda":
            raise ValueError(f"CUDA-graph decode needs a CUDA model; this one is on {device}")
        self.model, self.cache, self.cache_kw = model, cache, cache_kw
        self.graph, self.warmup = graph, warmup
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.captures = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None
        self._params = None
        self._eager_steps = 0

    def step(self, token: int, params: MobaParams, dense: bool = False) -> torch.Tensor:
        """Append `token` at the cache's length; return fp32 logits [V] after it. `params`: the MoBA
        settings the model's config carries (`agent.engine.Engine.params`); dense: the step runs inside
        `moba.hf.dense_queries()` with the dense question/answer policy (every layer exact).

        The result is the decoder's own buffer when a graph runs: read it before the next step.
        Raises CacheFullError when the cache is full.
        """
        n = self.cache.check_room(1) - 1
        self._check_params((params, dense))
        self.ids.fill_(token)
        self.positions.fill_(n)
        if self._graph is None and self.graph and self._eager_steps >= self.warmup:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
        else:
            self._logits = self._eager()
        self.cache.advance(1)
        return self._logits

    def _check_params(self, params: tuple[MobaParams, bool]) -> None:
        if params != self._params:
            self._graph, self._params, self._eager_steps = None, params, 0

    def _eager(self) -> torch.Tensor:
        self._eager_steps += 1
        if not self.graph:
            return self._forward()
        side = torch.cuda.Stream()  # warm-up off the default stream, as torch.cuda.graph asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward()
        torch.cuda.current_stream().wait_stream(side)
        return logits

    def _capture(self) -> None:
        self._graph = None  # frees the previous graph's pool before the new capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward()
        self._graph = graph
        self.captures += 1

    def _forward(self) -> torch.Tensor:
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "logits_to_keep": 1}
        with self.cache.static_positions(self.positions[0]):
            out = self.model(input_ids=self.ids, position_ids=self.positions, **kwargs)
        return out.logits[0, -1].float()
