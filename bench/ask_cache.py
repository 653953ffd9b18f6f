"""End-to-end time of two `moba-ask` questions on one repository: the second loads the prefilled
context from the context cache instead of prefilling. Each run is a fresh process (`moba-ask ... --json`).

Run: python -m bench.ask_cache --model smollm2-135m --modules 6 --funcs 12
The repository (`planted_repo`: filler modules and one planted constant, the shape of the tests'
fixture) is written to a temp dir; the context cache lives in a temp dir too (the model is read from
the normal cache).
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

from agent.pull import ensure

PLANTED = "7391046"


def planted_repo(root: Path, modules: int, funcs: int) -> Path:
    """A README, `modules` modules of `funcs` small functions each (~350 tokens per 2 functions) and
    src/settings.py holding MAGIC_NUMBER = PLANTED: the same files as the tests' fixture."""
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"][:modules]
    files = {"README.md": "# Pipelines\n\nA set of numeric pipelines.\n",
             "src/settings.py": '"""Settings of the pipelines."""\n\nRETRIES = 3\n'
                                f"MAGIC_NUMBER = {PLANTED}\n\n\ndef magic():\n    return MAGIC_NUMBER\n"}  # fmt: skip
    body = '    """Apply step {i} of the {name} pipeline to a list of values."""\n    total = 0\n'
    body += "    for v in values:\n        total += v * {k}\n    return total\n"
    for name in names:
        steps = (f"def {name}_step_{i}(values):\n" + body.format(i=i, name=name, k=i + 2) for i in range(funcs))
        files[f"src/{name}.py"] = f'"""The {name} pipeline."""\n\n\n' + "\n\n".join(steps)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


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
