"""Full-model prefill and decode on one GPU: a Qwen2.5-7B-Instruct-1M-shaped model with random bf16
weights, through the moba-ask engine (chunked prefill into a preallocated MobaCache, sparse decode).

Rows: MoBA prefill at each --tokens length (time, tok/s, peak GPU memory), dense SDPA prefill at each
--dense-tokens length, and MoBA decode after the longest prefill, twice from the same context: eager
(`decode="dynamic"`, one Python forward per token) and CUDA graph (`decode="graph"`, one replay per token,
timed after its warm-up and capture); the greedy tokens of the two are compared.
Prefill runs as a session's (`--prefill context`): all but the last token as a context whose logits nobody
reads (the last layer writes only its keys and values), then the last token with its logits; `--prefill
logits` runs every chunk whole, as the engine did before 2026-11-30; several values alternate in the MoBA rows.
Run (on the GPU machine): python -m bench.model_gpu --tokens 131072 262144 524288 1048576 --dense-tokens 131072 262144
                          python -m bench.model_gpu --tokens 1048576 --dense-tokens --decode 0 --prefill logits context
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import moba  # noqa: F401  (registers attn_implementation="moba")
from agent.engine import Engine, Sampling
from moba.hf import MobaParams, configure, dense_queries, moba_params

QWEN7B_1M = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=1_010_000,
                 rope_theta=10_000_000.0, tie_word_embeddings=False)


def build(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(**QWEN7B_1M)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="moba")
    return model.eval()


def prefill(model, n: int, chunk: int, decode: int = 0, qa_dense: bool = False, mode: str = "context") -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = Engine(model, capacity=n + decode + 8, chunk_size=chunk, decode="dynamic")
    ids = torch.randint(0, 150000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if mode == "context":
        engine.prefill(ids[:-1], logits=False)
        logits = engine.prefill(ids[-1:])
    else:
        logits = engine.prefill(ids)
    torch.cuda.synchronize()
    row = dict(tokens=n, seconds=time.perf_counter() - t0, kv_gib=engine.kv_bytes() / 2**30)
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if decode:
        secs, eager = _decode(engine, logits, n, decode)
        row["decode_tok_s"] = len(eager) / secs
        engine.decode = "graph"
        row["graph_warmup_s"] = _decode(engine, logits, n, 4)[0]  # 2 eager steps, the capture, 2 replays
        secs, graph = _decode(engine, logits, n, decode)
        row["graph_tok_s"] = len(graph) / secs
        row["same_tokens"] = graph == eager
        if qa_dense:
            row.update(_qa_dense_decode(model, engine, logits, n, decode))
    del engine
    return row


def _qa_dense_decode(model, engine: Engine, logits, context: int, tokens: int) -> dict:
    """Graph decode with the question/answer policy "dense" (exact attention over the whole context in
    every layer for the answer tokens), as `--qa-policy dense` runs it: tok/s after warm-up and capture."""
    sparse = moba_params(model.config)
    configure(model.config, replace(sparse, qa_policy="dense"))
    try:
        with dense_queries():
            _decode(engine, logits, context, 4)
            secs, _ = _decode(engine, logits, context, tokens)
    finally:
        configure(model.config, sparse)
    return {"qa_dense_graph_tok_s": tokens / secs}


def _decode(engine: Engine, logits, context: int, tokens: int) -> tuple[float, list[int]]:
    """Greedy-decode `tokens` tokens after the first `context` ones: (seconds, tokens)."""
    engine.truncate(context)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(logits, Sampling(max_new_tokens=tokens))
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, nargs="+", default=[131072, 262144, 524288, 1048576])
    p.add_argument("--dense-tokens", type=int, nargs="*", default=[131072, 262144])
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--qa-dense", action="store_true",
                   help="also decode after the longest prefill with the question/answer policy dense")
    p.add_argument("--prefill", nargs="+", choices=["context", "logits"], default=["context"],
                   help="context: as a session prefills (default); logits: every chunk whole; several alternate")
    a = p.parse_args()
    model = build()
    layers = model.config.num_hidden_layers
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; weights "
          f"{sum(x.numel() for x in model.parameters()) * 2 / 2**30:.1f} GiB bf16; chunk {a.chunk}", flush=True)
    print("| attention | tokens | prefill s | tok/s | KV GiB | peak GiB | decode tok/s | graph decode tok/s |\n"
          "|---|---|---|---|---|---|---|---|")
    sparse = MobaParams(a.block_size, a.top_k, a.sink_blocks)
    configure(model.config, sparse)
    label = f"moba {a.block_size}/{a.top_k}/sink{a.sink_blocks}"
    # warm-up: Triton specialises integer arguments divisible by 16 (block counts, lengths), so the
    # warm-up reaches 16 blocks and decodes there; every kernel variant compiles before the timed rows
    warm = prefill(model, 16 * a.block_size + 100, a.chunk, decode=40)
    _row(f"{label} (warm-up)", warm)
    for n in a.tokens:
        last = n == max(a.tokens)
        for mode in a.prefill:
            row = prefill(model, n, a.chunk, a.decode if last else 0, qa_dense=a.qa_dense and last, mode=mode)
            _row(label if a.prefill == ["context"] else f"{label}, prefill {mode}", row)
    configure(model.config, MobaParams(a.block_size, a.top_k, a.sink_blocks, tuple(range(layers))))
    for n in a.dense_tokens:
        _row("dense SDPA", prefill(model, n, a.chunk))


def _row(label: str, r: dict) -> None:
    dec = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
    graph = f"{r['graph_tok_s']:.1f}" if "graph_tok_s" in r else "-"
    print(f"| {label} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens'] / r['seconds']:,.0f} | "
          f"{r['kv_gib']:.1f} | {r['peak_gib']:.1f} | {dec} | {graph} |", flush=True)
    if "graph_tok_s" in r:
        print(f"graph decode: warm-up and capture {r['graph_warmup_s']:.2f} s (4 tokens); "
              f"same greedy tokens as eager: {r['same_tokens']}", flush=True)
    if "qa_dense_graph_tok_s" in r:
        print(f"graph decode with --qa-policy dense (exact attention in every layer): "
              f"{r['qa_dense_graph_tok_s']:.1f} tok/s", flush=True)


if __name__ == "__main__":
    main()
