"""Merge `moba-ask eval -o` documents of one benchmark run split over several processes (by config,
context size or repository, e.g. to fit a 10-minute limit per command) into one document and report.

    python -m bench.eval_merge A.json B.json ... [-o merged.json] > merged.md

The documents must share the model and the seed, and a task present in two documents (same repository,
size and id) must be the same question with the same gold; its per-config results are joined. Every
task must end with a result for every config (else the merge names what is missing), so that the
intervals and paired differences are over the same tasks. Knows nothing of models.
"""

from __future__ import annotations

import json
import sys

from agent.evaluate import report

GOLD = ("kind", "name", "path", "start_line", "end_line", "question")


def merge(docs: list[dict]) -> dict:
    """One document from several; raises ValueError naming the first conflict."""
    first = docs[0]["meta"]
    for d in docs[1:]:
        for key in ("model", "seed", "max_new_tokens"):
            if d["meta"].get(key) != first.get(key):
                raise ValueError(f"documents differ in {key}: {first.get(key)!r} vs {d['meta'].get(key)!r}")
    tasks: dict[tuple, dict] = {}
    configs: dict[str, dict] = {}
    units: dict[tuple, dict] = {}
    for d in docs:
        configs.update({c["name"]: c for c in d["meta"]["configs"]})
        units.update({(u["repo"], u["context_tokens"]): u for u in d["meta"]["repos"]})
        for t in d["tasks"]:
            key = (t["repo"], t["context_tokens"], t["id"])
            if key in tasks and any(tasks[key][g] != t[g] for g in GOLD):
                raise ValueError(f"task {key} differs between documents (other repositories or task choice)")
            tasks.setdefault(key, {**t, "results": {}})["results"].update(t["results"])
    missing = [(k, c) for k, t in tasks.items() for c in configs if c not in t["results"]]
    if missing:
        raise ValueError(f"{len(missing)} task results missing, e.g. config {missing[0][1]!r} of task {missing[0][0]}")
    timings = [x for d in docs for x in d["timings"]]
    meta = dict(first, configs=list(configs.values()), repos=list(units.values()),
                complete=all(d["meta"].get("complete") for d in docs))
    return report.build(list(tasks.values()), timings, list(configs), meta, first["seed"])


def main(argv: list[str]) -> None:
    out = None
    if "-o" in argv:
        i = argv.index("-o")
        out, argv = argv[i + 1], argv[:i] + argv[i + 2:]
    if not argv:
        sys.exit("usage: eval_merge.py A.json B.json ... [-o merged.json]")
    try:
        doc = merge([json.load(open(p, encoding="utf-8")) for p in argv])
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        sys.exit(f"eval_merge: {e}")
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    sys.stdout.write(report.to_markdown(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
