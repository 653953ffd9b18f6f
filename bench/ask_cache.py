"""End-to-end time of two `moba-ask` questions on one repository: the second loads the prefilled
context from the context cache instead of prefilling. Each run is a fresh process (`moba-ask ... --json`).

Run: python bench/ask_cache.py --model smollm2-135m --modules 6 --funcs 12
The repository is the planted-constant fixture of the tests, written to a temp dir; the context cache
lives in a temp dir too (the model is read from the normal cache).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.models import ensure  # noqa: E402
from tests.agent.repogen import planted_repo  # noqa: E402


def ask(repo: Path, model: str, cache: str) -> tuple[float, dict]:
    env = dict(os.environ, MOBA_ASK_CACHE_DIR=cache)
    cmd = [str(Path(sys.executable).parent / "moba-ask"), str(repo), "What is the value of MAGIC_NUMBER?", "-m", model, "--json", "--max-new-tokens", "16"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return time.perf_counter() - t0, json.loads(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--modules", type=int, default=6)
    p.add_argument("--funcs", type=int, default=12)
    a = p.parse_args()
    model = str(ensure(a.model))
    with tempfile.TemporaryDirectory() as tmp:
        repo = planted_repo(Path(tmp) / "repo", modules=a.modules, funcs=a.funcs)
        cache = str(Path(tmp) / "cache")
        print("| run | wall s | cache_hit | prefill_s | context tokens | answer |\n|---|---|---|---|---|---|")
        for run in ("first", "second"):
            wall, r = ask(repo, model, cache)
            s = r["stats"]
            print(f"| {run} | {wall:.1f} | {s['cache_hit']} | {s['prefill_s']} | {s['context_tokens']:,} | "
                  f"{r['answer'][:40]!r} |", flush=True)


if __name__ == "__main__":
    main()
