"""Tensor-parallel MoBA on the GPUs of one host (issue 17): Qwen2.5-*-1M-shaped models with random bf16 weights,
sharded by transformers' tensor-parallel plan (`tp_plan="auto"`, as `moba-ask --gpus N` loads them) and run
through agent.parallel.ParallelEngine (chunked prefill into each rank's MobaCache, rank 0 picks the tokens).

Cases (each fits one 10-minute command on 2 x H200):
  scaling  the 7B shape at --tokens (default 1,048,576) on 1 GPU (rank 0 alone, agent.engine.Engine) and then
           on all ranks, from the same weights and prompt; the 1-GPU and N-GPU runs are compared: the last
           prefill logits (max |diff|, top-1) and the greedy decode tokens; --noise-floor also compares the 1-GPU
           run with itself at half the prefill chunk (what a change of bf16 summation order alone makes).
  7b-2m    the 7B shape at 2,097,152 tokens on all ranks.
  14b-1m   the Qwen2.5-14B-Instruct-1M shape (48 layers, hidden 5120, 40 query / 8 KV heads) at 1,048,576 tokens.
  tiny     a 4-layer toy shape on whatever is there (CPU and gloo without CUDA): a smoke run of this script.
Rows: prefill s, tok/s, peak memory of every rank, decode tok/s of each path of `--decode-paths` (greedy, from the
same prefill; qa-dense is the dense question/answer policy's decode).
The random checkpoint is written once per shape by rank 0 under --weights and loaded with from_pretrained.

Run (on the GPU machine, from the repository root; it starts --gpus ranks itself, or run it under torchrun):
  python -m bench.tp_gpu --case scaling
  python -m bench.tp_gpu --case 7b-2m
  python -m bench.tp_gpu --case 14b-1m
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config

import moba  # noqa: F401  (registers attn_implementation="moba")
from agent import parallel
from agent.engine import Engine, Sampling
from bench.model_gpu import QWEN7B_1M
from moba.hf import MobaParams, configure, dense_queries

QWEN14B_1M = dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                  num_attention_heads=40, num_key_value_heads=8, max_position_embeddings=1_010_000,
                  rope_theta=10_000_000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1_010_000, tie_word_embeddings=False)
QA_DENSE = "qa-dense"
CASES = {"scaling": ("7b", QWEN7B_1M, 1_048_576), "7b-2m": ("7b", QWEN7B_1M, 2_097_152),
         "14b-1m": ("14b", QWEN14B_1M, 1_048_576), "tiny": ("tiny", TINY, 4096)}


def checkpoint(name: str, shape: dict, root: Path, tokens: int, device: torch.device) -> Path:
    """The random bf16 checkpoint of `shape` (seed 0) under root/name, written by rank 0 if missing. Its
    max_position_embeddings covers 2M tokens and `tokens` (a 2M run of a 1M shape measures the system)."""
    path = root / name
    if dist.get_rank() == 0 and not (path / "config.json").is_file():
        torch.manual_seed(0)
        positions = max(shape["max_position_embeddings"], 2_097_152 + 1024, tokens + 1024)
        cfg = Qwen2Config(**{**shape, "max_position_embeddings": positions})
        with device:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        _empty(device)
    dist.barrier()
    return path


def load_one(path: Path, device: torch.device):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="moba",
                                                device_map=str(device)).eval()


def load_sharded(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="moba",
                                                 **parallel.shard_kwargs(path)).eval()
    parallel.mark_heads(model)
    return model


def run(model, engine_cls, n: int, a, device: torch.device, collective: bool) -> dict:
    """Prefill n random tokens (seeded by n), then greedy-decode a.decode tokens on each decode path of
    a.decode_paths from the same prefilled cache (QA_DENSE: the answer tokens attend every key in every
    layer, as `--qa-policy dense` decodes): times, peaks, logits, tokens (of the first path)."""
    _empty(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    paths = a.decode_paths.split(",")
    engine = engine_cls(model, capacity=n + a.decode + 8, chunk_size=a.chunk, decode=paths[0])
    ids = torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    t0 = _now(device, collective)
    logits = engine.prefill(ids)
    t1 = _now(device, collective)
    row = dict(tokens=n, prefill_s=t1 - t0, logits=logits.cpu(), kv_gib=engine.kv_bytes() / 2**30, decode={})
    sparse = engine.params
    for path in paths:
        engine.truncate(n)
        qa_dense = path == QA_DENSE
        engine.decode = "dynamic" if qa_dense else path
        engine.params = replace(sparse, qa_policy="dense") if qa_dense else sparse
        with dense_queries(qa_dense):
            tokens, rate = _decode(engine, logits, a.decode, device, collective)
        row["decode"][path] = rate
        row.setdefault("greedy", tokens)
    row["peaks"] = [torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0]
    del engine
    return row


def _decode(engine, logits, n: int, device, collective: bool) -> tuple[list[int], float | str]:
    """Greedy tokens and tok/s of one decode path (a captured path's first token includes its capture, so
    the rate is over the tokens after the first); the error, one line, where the path fails."""
    stamps = []
    try:
        t0 = _now(device, collective)
        tokens = engine.generate(logits, Sampling(max_new_tokens=n),
                                 on_token=lambda tok: stamps.append(_now(device, False)) and False)
        t1 = _now(device, collective)
    except (RuntimeError, ValueError) as e:
        return [], f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    timed = len(stamps) - 1
    return tokens, (timed / (t1 - stamps[0]) if timed > 0 else len(tokens) / (t1 - t0))


def _now(device: torch.device, collective: bool) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if collective:
        dist.barrier()
    return time.perf_counter()


def _empty(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sharded_rows(path: Path, a, device: torch.device) -> dict:
    """Warm-up, then the timed run on all ranks; peaks gathered from every rank."""
    model = load_sharded(path)
    configure(model.config, MobaParams(a.block_size, a.top_k, a.sink_blocks))
    run(model, parallel.ParallelEngine, min(a.tokens, 16 * a.block_size + 100), _short(a), device, True)
    row = run(model, parallel.ParallelEngine, a.tokens, a, device, True)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, row["peaks"][0])
    row["peaks"] = peaks
    return row


def one_gpu_row(path: Path, a, device: torch.device) -> tuple[dict | None, dict | None]:
    """Rank 0 alone on its GPU with the whole model (the others wait): its row, and with --noise-floor a second
    run with half the prefill chunk (another summation order, the same math); (None, None) on other ranks."""
    row = floor = None
    if dist.get_rank() == 0:
        model = load_one(path, device)
        configure(model.config, MobaParams(a.block_size, a.top_k, a.sink_blocks))
        run(model, Engine, min(a.tokens, 16 * a.block_size + 100), _short(a), device, False)
        row = run(model, Engine, a.tokens, a, device, False)
        if a.noise_floor:
            floor = run(model, Engine, a.tokens, argparse.Namespace(**{**vars(a), "chunk": a.chunk // 2}), device, False)
        del model
        _empty(device)
    dist.barrier()
    return row, floor


def _short(a):
    return argparse.Namespace(**{**vars(a), "decode": 8})


def report(label: str, ranks: int, r: dict) -> None:
    peaks = " / ".join(f"{p:.1f}" for p in r["peaks"])
    decode = " / ".join(f"{path} {v:.1f}" if isinstance(v, float) else f"{path} {v}" for path, v in r["decode"].items())
    print(f"| {label} | {ranks} | {r['tokens']:,} | {r['prefill_s']:.1f} | {r['tokens'] / r['prefill_s']:,.0f} | "
          f"{r['kv_gib']:.1f} | {peaks} | {decode} |", flush=True)


def agreement(one: dict, many: dict, other: str | None = None) -> str:
    diff = (one["logits"] - many["logits"]).abs().max().item()
    scale = one["logits"].abs().max().item()
    same_top1 = int(one["logits"].argmax()) == int(many["logits"].argmax())
    equal = sum(x == y for x, y in zip(one["greedy"], many["greedy"]))
    first = next((i for i, (x, y) in enumerate(zip(one["greedy"], many["greedy"])) if x != y), None)
    other = other or f"{dist.get_world_size()} GPUs"
    return (f"1 GPU vs {other} at {one['tokens']:,} tokens: max |logit diff| {diff:.4f} "
            f"(max |logit| {scale:.2f}; bf16 step there {scale * 2**-8:.4f}), same top-1: {same_top1}, greedy tokens "
            f"equal {equal}/{len(one['greedy'])}" + ("" if first is None else f", first difference at token {first}"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=list(CASES), default="scaling")
    p.add_argument("--tokens", type=int, default=None, help="context length (default: the case's)")
    p.add_argument("--gpus", type=int, default=2, help="ranks to start when not under torchrun")
    p.add_argument("--weights", type=Path, default=Path("/tmp/moba-ask-tp-weights"))
    p.add_argument("--block-size", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=12)
    p.add_argument("--sink-blocks", type=int, default=1)
    p.add_argument("--chunk", type=int, default=16384)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--noise-floor", action="store_true",
                   help="scaling/tiny: also run the 1-GPU prefill with half the chunk and compare it with the first "
                        "(the bf16 differences a mere change of summation order makes)")
    p.add_argument("--decode-paths", default=None,
                   help="comma list of decode paths timed from the same prefill (dynamic, static, graph, qa-dense; default: "
                        "dynamic,graph,qa-dense on CUDA, dynamic,static,qa-dense on the CPU); the first one's tokens are compared")
    a = p.parse_args()
    if parallel.world() is None:
        sys.exit(parallel.launch(a.gpus, ["-m", "bench.tp_gpu", *sys.argv[1:]]))
    name, shape, tokens = CASES[a.case]
    a.tokens = a.tokens or tokens
    if a.case == "tiny":
        a.block_size, a.chunk, a.decode = min(a.block_size, 64), min(a.chunk, 1024), min(a.decode, 8)
    device = _join()
    a.decode_paths = a.decode_paths or ("dynamic,graph,qa-dense" if device.type == "cuda" else "dynamic,static,qa-dense")
    path = checkpoint(name, shape, a.weights, a.tokens, device)
    if dist.get_rank() == 0:
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (gloo)"
        print(f"{a.case}: {gpu} x {dist.get_world_size()}, torch {torch.__version__}; MoBA {a.block_size}/{a.top_k}/"
              f"sink{a.sink_blocks}, chunk {a.chunk}, decode {a.decode} tokens ({a.decode_paths})\n"
              "| shape | GPUs | tokens | prefill s | tok/s | KV GiB per GPU | peak GiB per GPU | decode tok/s |\n"
              "|---|---|---|---|---|---|---|---|", flush=True)
    one, floor = one_gpu_row(path, a, device) if a.case in ("scaling", "tiny") else (None, None)
    if one is not None:
        report(name, 1, one)
    many = sharded_rows(path, a, device)
    if dist.get_rank() == 0:
        report(name, dist.get_world_size(), many)
        if one is not None:
            print(agreement(one, many), flush=True)
        if floor is not None:
            print("noise floor, " + agreement(one, floor, f"1 GPU at chunk {a.chunk // 2:,}"), flush=True)
    dist.destroy_process_group()


def _join() -> torch.device:
    """Join the ranks as moba-ask does (agent.parallel.setup), with a timeout that outlasts rank 0's 1-GPU run."""
    w = parallel.world()
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(w.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(hours=1),
                                device_id=torch.device("cuda", w.local_rank) if cuda else None)
    return torch.device(parallel.setup(w, "cuda" if cuda else "cpu"))


if __name__ == "__main__":
    main()
