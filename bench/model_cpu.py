"""CPU prefill and decode speed of real models through the moba-ask engine: MoBA vs dense SDPA.

Token ids are random (speed does not depend on the text). Prefill runs in the engine's CPU chunks
(1024) into a MobaCache, as a session prefills: all but the last token as a context whose logits nobody
reads (the last layer writes only its keys and values), then the last token with its logits
(`--prefill context`); `--prefill logits` runs every chunk whole, as the engine did before 2026-11-30.
Decode is greedy for --decode tokens after the prefill. `--dtype default` loads
the CPU default form (4-bit/int8 weights, bf16 activations where the CPU has bf16); `--dense-layers`
keeps those layers dense in the MoBA rows (last3: the CPU default).
Run: python -m bench.model_cpu --model smollm2-135m --tokens 4096 8192 --dtype float32 bfloat16
     python -m bench.model_cpu --model qwen2.5-coder-1.5b --tokens 30000 --dtype default --dense-layers last3
     python -m bench.model_cpu --model qwen2.5-coder-1.5b --tokens 8192 --dtype default --attention dense \
         --prefill logits context logits context
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from agent.config import AskConfig, parse_layers
from agent.engine import Sampling
from agent.runtime import load_runtime, params_for
from moba.hf import configure


def run(rt, model_cfg, attention: str, tokens: int, decode: int, cfg: AskConfig,
        mode: str = "context") -> tuple[float, float]:
    configure(model_cfg, params_for(AskConfig(**{**cfg.__dict__, "attention": attention}), model_cfg.num_hidden_layers))
    engine = rt.make_engine(tokens + decode + 8)
    ids = torch.randint(100, 20000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    if mode == "context":
        engine.prefill(ids[:-1], logits=False)
        logits = engine.prefill(ids[-1:])
    else:
        logits = engine.prefill(ids)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.generate(logits, Sampling(max_new_tokens=decode))
    dec = time.perf_counter() - t0
    return tokens / prefill, len(out) / dec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192])
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--attention", nargs="+", default=["moba", "dense"])
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dense-layers", default="none", help="layers kept dense in the MoBA rows (last3, first2, ...)")
    p.add_argument("--prefill", nargs="+", choices=["context", "logits"], default=["context"],
                   help="context: as a session prefills (default); logits: every chunk whole; several alternate")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | dtype | tokens | attention | prefill | prefill tok/s | decode tok/s |\n|---|---|---|---|---|---|---|")
    for dtype in a.dtype:
        cfg = AskConfig(model=a.model, dtype=None if dtype == "default" else dtype, device="cpu",
                        dense_layers=parse_layers(a.dense_layers))
        rt = load_runtime(cfg)
        model_cfg = rt.make_engine(8).config
        for n in a.tokens:
            for att in a.attention:
                for mode in a.prefill:
                    pre, dec = run(rt, model_cfg, att, n, a.decode, cfg, mode)
                    label = att if att == "dense" else (f"moba {cfg.block_size}/{cfg.top_k}/sink{cfg.sink_blocks}"
                                                        f", dense layers {a.dense_layers}")
                    print(f"| {a.model} | {dtype} | {n} | {label} | {mode} | {pre:,.0f} | {dec:.1f} |", flush=True)


if __name__ == "__main__":
    main()
