"""Packing speed: cold (empty token cache) and warm packs of a real repository with a real tokenizer.

Reports files, tokens, cold and warm seconds (pack() only, tokenizer already loaded), files/s and
tokens/s, the CPU seconds the process used (cpu/wall = cores effectively used), the CPUs the
process may run on and the load average, plus the wall time of a warm `moba-ask pack` in a fresh
process (imports and tokenizer load included). Target (issue 3): >= 1M tokens in <= 5 s cold and
<= 1 s warm on 2 cores. Pin cores with `taskset -c 0,1`.

Prepare a repository (only PyPI is reachable), e.g. pytest's source tree, 2.2M smollm2 tokens:

    pip download --no-deps --no-binary=:all: pytest==8.3.4 -d /tmp/b && tar xzf /tmp/b/pytest-8.3.4.tar.gz -C /tmp/b
    cd /tmp/b/pytest-8.3.4 && git init -q && git add -A && git commit -qm src

and a tokenizer: `moba-ask models pull smollm2-135m` (pass the printed hf/ dir), or any tokenizer.json.

    python -m bench.pack /tmp/b/pytest-8.3.4 --model ~/.cache/moba-ask/models/smollm2-135m/hf
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ingest
from agent.load import load_tokenizer
from agent.pull import ensure


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_pack(path: str, tokenizer, options: ingest.PackOptions) -> tuple[float, float, ingest.Pack]:
    """(wall seconds, cpu seconds, pack) of one pack() call."""
    c0, t0 = _cpu(), time.perf_counter()
    p = ingest.pack(path, tokenizer, options)
    return time.perf_counter() - t0, _cpu() - c0, p


def run(path: str, model: str, repeat: int) -> dict:
    """Cold and warm timings over `repeat` rounds, each cold round with a fresh token cache."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(model)
    load_s = time.perf_counter() - t0
    local = local_model(model)
    cold, warm, cold_cpu, warm_cpu = [], [], [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as cache:
            options = ingest.PackOptions(token_cache=Path(cache) / "tokens")
            w, c, p = timed_pack(path, tokenizer, options)
            cold.append(w)
            cold_cpu.append(c)
            w, c, p2 = timed_pack(path, tokenizer, options)
            warm.append(w)
            warm_cpu.append(c)
            assert (p.ids == p2.ids).all()
            cli = cli_warm(path, local, cache)
    size = sum(f.bytes for f in p.files)
    return {
        "path": path, "model": model, "files": len(p.files), "tokens": p.total_tokens, "bytes": size,
        "skipped": len(p.skipped), "tokenizer_load_s": round(load_s, 3),
        "cold_s": [round(x, 3) for x in cold], "warm_s": [round(x, 3) for x in warm],
        "cold_median_s": round(statistics.median(cold), 3), "warm_median_s": round(statistics.median(warm), 3),
        "cold_files_per_s": round(len(p.files) / statistics.median(cold)),
        "cold_tokens_per_s": round(p.total_tokens / statistics.median(cold)),
        "warm_tokens_per_s": round(p.total_tokens / statistics.median(warm)),
        "cold_cpu_s": [round(x, 3) for x in cold_cpu], "warm_cpu_s": [round(x, 3) for x in warm_cpu],
        "cold_cores_used": round(statistics.median(c / w for c, w in zip(cold_cpu, cold)), 2),
        "cli_warm_wall_s": round(cli, 3), "cpus_allowed": len(os.sched_getaffinity(0)),
        "loadavg_1m": round(os.getloadavg()[0], 2), "machine": f"{platform.machine()} {platform.node()}",
        "python": platform.python_version(),
    }


def local_model(model: str) -> str:
    """A local path for model (never pulls), for the `moba-ask pack` process whose cache dir is redirected."""
    if Path(model).exists():
        return model
    return str(ensure(model, pull=False))


def cli_warm(path: str, model: str, cache: str) -> float:
    """Wall seconds of `moba-ask pack PATH -m MODEL_DIR -q` in a fresh process with a warm token cache."""
    root = Path(__file__).resolve().parents[1]
    cmd = [str(Path(sys.executable).parent / "moba-ask"), "pack", path, "-m", model, "-q"]
    env = {**os.environ, "MOBA_ASK_CACHE_DIR": cache, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=root, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", help="repository to pack")
    ap.add_argument("--model", required=True, help="tokenizer.json, a dir holding one, or a catalog name")
    ap.add_argument("--repeat", type=int, default=3, help="rounds of cold+warm (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    result = run(args.path, args.model, args.repeat)
    if args.json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        print(f"{k:>20}: {v}")


if __name__ == "__main__":
    main()
