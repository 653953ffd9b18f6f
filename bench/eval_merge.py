"""Merge `moba-ask eval -o` documents of one benchmark run split over several processes (by config,
context size or repository, e.g. to fit a 10-minute limit per command) into one document and report.

    python -m bench.eval_merge A.json B.json ... [-o merged.json] [--configs dense] [--rerank] > merged.md

--configs keeps only the named configs (to pool one config over runs that ran different others).
--rerank puts every stored answer's citations in the order `agent.citations.ranked` gives them now and
re-scores what depends on that order (file ranks, top-1/top-3 citation), for runs stored before the order
changed (2026-11-30: text references first -> routing strength first).

The documents must share the model and the seed, and a task present in two documents (same repository,
size and id) must be the same question with the same gold; its per-config results are joined. Every
task must end with a result for every config (else the merge names what is missing), so that the
intervals and paired differences are over the same tasks. Knows nothing of models.
"""

from __future__ import annotations

import argparse
import json
import sys

from agent import citations as cit
from agent.evaluate import report
from agent.evaluate.runner import order_scores

GOLD = ("kind", "name", "path", "start_line", "end_line", "question")


def merge(docs: list[dict], keep: list[str] | None = None, rerank: bool = False) -> dict:
    """One document from several (only the configs in `keep`, when given; citations re-ranked when
    `rerank`); raises ValueError naming the first conflict."""
    docs = [only(d, keep) for d in docs] if keep else docs
    if rerank:
        docs = [reranked(d) for d in docs]
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


def only(doc: dict, keep: list[str]) -> dict:
    """`doc` with the configs in `keep` alone; ValueError when it ran none of them."""
    configs = [c for c in doc["meta"]["configs"] if c["name"] in keep]
    if not configs:
        raise ValueError(f"no config of {keep} in a document (it ran {[c['name'] for c in doc['meta']['configs']]})")
    tasks = [{**t, "results": {k: v for k, v in t["results"].items() if k in keep}} for t in doc["tasks"]]
    timings = [x for x in doc["timings"] if x.get("config") in keep]
    return {**doc, "meta": {**doc["meta"], "configs": configs}, "tasks": tasks, "timings": timings}


def reranked(doc: dict) -> dict:
    """`doc` with each answer's citations in today's order and its order-dependent scores redone."""
    tasks = []
    for t in doc["tasks"]:
        results = {}
        for name, r in t["results"].items():
            cites = cit.ranked([cit.Citation.from_dict(c) for c in r["citations"]])
            results[name] = {**r, **order_scores(cites, t["path"], t["start_line"], t["end_line"]),
                             "citations": [c.to_dict() for c in cites]}
        tasks.append({**t, "results": results})
    return {**doc, "tasks": tasks}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.eval_merge", description=__doc__.split("\n\n")[0])
    p.add_argument("docs", nargs="+", metavar="RUN.json")
    p.add_argument("-o", dest="out", metavar="FILE", help="also write the merged JSON document")
    p.add_argument("--configs", help="comma list: keep only these configs")
    p.add_argument("--rerank", action="store_true", help="citations in today's order, order scores redone")
    a = p.parse_args(argv)
    try:
        keep = a.configs.split(",") if a.configs else None
        doc = merge([json.load(open(f, encoding="utf-8")) for f in a.docs], keep, a.rerank)
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as e:
        sys.exit(f"eval_merge: {e}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    sys.stdout.write(report.to_markdown(doc))


if __name__ == "__main__":
    main(sys.argv[1:])
