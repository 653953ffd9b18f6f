"""moba-ask against llama.cpp on the CPU, same GGUF, same machine, same run: prefill tok/s, decode tok/s,
peak RSS.

Each measurement is its own child process (so its peak RSS is its own): load the model, prefill N random
token ids, decode --decode tokens greedily. moba-ask runs what `moba-ask ask` runs on a CPU: the default
quantized weights (4-bit where the GGUF is 4-bit, else int8; converted once, before any timing), the
engine's chunked prefill into its MobaCache and `attention auto` settled for N (agent.config.settle).
The prefill computes the last token's logits through every layer, as llama.cpp's does (a session's
context prefill skips the last layer's unread work, a few percent faster: bench/RESULTS.md).
llama.cpp runs through llama-cpp-python (a benchmark dependency only, built from source by pip) with its
defaults and the same thread count.
Runs are interleaved (for each repeat, for each context: moba-ask, then llama.cpp) and `uptime`'s load
is recorded before each, since other work may share the cores; the table gives the median and the
[min, max] over repeats.
Needs `pip install llama-cpp-python` (compiles llama.cpp, ~30 min on 2 busy cores; never a runtime
dependency of moba-ask).
Run: python -m bench.cpu_llama --gguf /tmp/qwen.gguf --contexts 2048 4096 --repeats 3
(--engines moba-ask runs one side only: llama-cpp-python is then not needed.)
Knows nothing of packing, prompts or citations.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("moba-ask", "llama.cpp")


def _ids(n: int, vocab: int = 150_000) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(1000, vocab) for _ in range(n)]


def _moba_child(gguf: str, tokens: int, decode: int, threads: int) -> dict:
    import torch

    from agent.config import AskConfig, settle
    from agent.engine import Sampling
    from agent.runtime import load_runtime, params_for
    from moba.hf import configure

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = AskConfig(model=gguf, device="cpu")
    rt = load_runtime(cfg)
    engine = rt.make_engine(tokens + decode + 8)
    settled = settle(cfg, tokens, "cpu")
    configure(engine.model.config, params_for(settled, engine.config.num_hidden_layers))
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = engine.prefill(_ids(tokens))
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = engine.generate(logits, Sampling(max_new_tokens=decode))
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": tokens / prefill_s, "decode_tok_s": len(out) / decode_s,
            "attention": settled.attention, "notes": list(rt.notes)}


def _llama_child(gguf: str, tokens: int, decode: int, threads: int) -> dict:
    import llama_cpp

    _without_extra_buffers(llama_cpp)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=tokens + decode + 8, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    ids = _ids(tokens + decode)
    t0 = time.perf_counter()
    llm.eval(ids[:tokens])
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in ids[tokens:]:  # one token per step, as decode; its speed does not depend on which token
        llm.eval([tok])
    decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": tokens / prefill_s, "decode_tok_s": decode / decode_s,
            "llama_cpp": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}


def _without_extra_buffers(llama_cpp) -> None:
    """Load with use_extra_bufts off: llama-cpp-python 0.3.36 built natively here segfaults in
    llama_decode on any batch of more than one token with its extra (AMX / repacked) weight buffers
    (single tokens run); Llama() has no argument for it, so its default model params are patched."""
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama.llama_cpp.llama_model_default_params = params


def _child(a) -> None:
    run = _moba_child if a.child == "moba-ask" else _llama_child
    result = run(a.gguf, a.tokens, a.decode, a.threads)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def _load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average: ")[-1]


def _measure(engine: str, a, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "bench.cpu_llama", "--child", engine, "--gguf", a.gguf, "--tokens", str(tokens),
           "--decode", str(a.decode), "--threads", str(a.threads)]
    load = _load()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"engine": engine, "tokens": tokens, "error": f"exit {done.returncode}: {tail}", "load": load}
    return {"engine": engine, "tokens": tokens, "load": load, **json.loads(lines[-1][len("RESULT "):])}


def _prepare(gguf: str) -> None:
    """Convert the GGUF to moba-ask's default (quantized) form once, outside any timing, in a process of its
    own: a child forked from a parent that held the conversion's ~10 GB starts with that as its peak RSS
    (Linux keeps the high-water mark across fork and exec), which every measurement would then report."""
    code = "import sys; from agent.pull import pull; pull(sys.argv[1], progress=True, quantized=True)"
    subprocess.run([sys.executable, "-c", code, gguf], check=True)


def _interval(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]" if len(values) > 1 else f"{med:{fmt}}"


def _table(results: list[dict], contexts: list[int]) -> list[str]:
    rows = ["| context | engine | prefill tok/s | decode tok/s | peak RSS MiB | runs | ratio prefill / decode |",
            "|---|---|---|---|---|---|---|"]
    for n in contexts:
        med = {"moba-ask": None}
        for engine in [e for e in ENGINES if any(r["engine"] == e for r in results)]:
            ok = [r for r in results if r["engine"] == engine and r["tokens"] == n and "error" not in r]
            pre, dec = [r["prefill_tok_s"] for r in ok], [r["decode_tok_s"] for r in ok]
            rss = [r["peak_rss_mb"] for r in ok]
            med[engine] = (statistics.median(pre), statistics.median(dec)) if ok else None
            ratio = ""
            if engine == "moba-ask" and ok:
                ratio = "see llama.cpp row"
            if engine == "llama.cpp" and ok and med["moba-ask"]:
                ratio = f"moba-ask {med['moba-ask'][0] / med[engine][0]:.2f}x / {med['moba-ask'][1] / med[engine][1]:.2f}x"
            rows.append(f"| {n:,} | {engine} | {_interval(pre, ',.1f')} | {_interval(dec, '.2f')} | "
                        f"{_interval(rss, ',.0f')} | {len(ok)} | {ratio} |")
    return rows


def _header(a) -> list[str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    import torch

    return [f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"machine: {cpu}, {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, "
            f"{a.threads} threads each",
            f"gguf: {a.gguf}", f"command: python -m bench.cpu_llama {' '.join(sys.argv[1:])}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", required=True, help="the GGUF both engines run")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--timeout", type=int, default=3600, help="seconds per child run")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES), help="which sides to run")
    p.add_argument("--out", type=Path, help="also write every run as JSON lines here")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.gguf = str(Path(a.gguf).expanduser().resolve())
    if a.child:
        return _child(a)
    if not Path(a.gguf).is_file():
        p.error(f"no such GGUF file: {a.gguf}")
    _prepare(a.gguf)
    print("\n".join(_header(a)), flush=True)
    results = []
    for rep in range(a.repeats):
        for n in a.contexts:
            for engine in a.engines:
                r = _measure(engine, a, n)
                results.append({**r, "repeat": rep})
                print(json.dumps({k: v for k, v in r.items() if k not in ("system_info", "notes")}), flush=True)
                if a.out:
                    with a.out.open("a") as f:
                        f.write(json.dumps({**r, "repeat": rep}) + "\n")
    print(f"uptime load (1/5/15 min) before each run: {'; '.join(r['load'] for r in results)}")
    print("\n".join(_table(results, a.contexts)))


if __name__ == "__main__":
    main()
