"""Load time of a pulled catalog model: the converted hf/ safetensors vs the GGUF it came from.

Each load runs in a fresh Python process (imports excluded from the timing; the OS page cache is
warm after the first run). It also checks that both give the same logits on a short prompt.

    python -m bench.model_load smollm2-135m --repeats 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
root, kind = Path(sys.argv[1]), sys.argv[2]
kw = {} if kind == "hf" else {"gguf_file": next(root.glob("*.gguf")).name}
src = root / "hf" if kind == "hf" else root
t0 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(src, **kw)
t1 = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
t2 = time.perf_counter()
ids = tok("def main():\n    print('hello world')\n", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0, -1].tolist()
print(json.dumps({"tokenizer_s": t1 - t0, "model_s": t2 - t1, "logits": logits}))
"""


def run(root: str, kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, root, kind], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="catalog name, already pulled (moba-ask models pull NAME)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from agent.catalog import resolve
    from agent.pull import model_dir

    root = str(model_dir(resolve(args.name)))
    results = {kind: [run(root, kind) for _ in range(args.repeats)] for kind in ("hf", "gguf")}
    diff = max(abs(a - b) for a, b in zip(results["hf"][0]["logits"], results["gguf"][0]["logits"]))
    print(f"| model | source | tokenizer load s | model load s | (runs: {args.repeats}) |")
    print("|---|---|---|---|---|")
    for kind, runs in results.items():
        tok = " / ".join(f"{r['tokenizer_s']:.2f}" for r in runs)
        mod = " / ".join(f"{r['model_s']:.2f}" for r in runs)
        print(f"| {args.name} | {kind} | {tok} | {mod} | |")
    print(f"\nmax |logit(hf) - logit(gguf)| at the last position: {diff:.3g}")


if __name__ == "__main__":
    main()
