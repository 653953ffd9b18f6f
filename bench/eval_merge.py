"""Merge `moba-ask eval -o` documents of the same tasks run in separate processes (configs split over
GPUs or processes) into one document, so that every config gets its paired difference against dense.

    python -m bench.eval_merge OUT.json RUN1.json RUN2.json ...   # prints the markdown report

The runs must share model, repositories, sizes, tasks and seed (a task is matched by repository,
context size and id, and its question must agree); each config's results are taken from the run that
has them, "dense" first. Knows nothing of models.
"""

from __future__ import annotations

import json
import sys

from agent.evaluate import report


def merge(docs: list[dict]) -> dict:
    """One eval document from several over the same tasks. Raises ValueError when they disagree."""
    first = docs[0]
    seeds = {d["meta"]["seed"] for d in docs}
    if len(seeds) != 1:
        raise ValueError(f"the runs have different seeds: {sorted(seeds)}")
    tasks = {_key(t): json.loads(json.dumps(t)) for t in first["tasks"]}
    for d in docs[1:]:
        if {_key(t) for t in d["tasks"]} != set(tasks):
            raise ValueError("the runs have different task sets (repositories, sizes, seed or --tasks differ)")
        for t in d["tasks"]:
            mine = tasks[_key(t)]
            if mine["question"] != t["question"]:
                raise ValueError(f"task {_key(t)} has different questions in two runs")
            mine["results"].update(t["results"])
    names = list(dict.fromkeys(n for d in docs for n in _config_names(d)))
    names.sort(key=lambda n: n != report.DENSE)
    meta = dict(first["meta"], configs=[c for d in docs for c in d["meta"]["configs"]])
    meta.pop("resamples", None)
    meta.pop("level", None)
    timings = [t for d in docs for t in d["timings"]]
    return report.build(list(tasks.values()), timings, names, meta, first["meta"]["seed"])


def _key(t: dict) -> tuple:
    return t["repo"], t["context_tokens"], t["id"]


def _config_names(doc: dict) -> list[str]:
    return list(dict.fromkeys(row["config"] for row in doc["summary"]))


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    docs = []
    for path in argv[1:]:
        with open(path, encoding="utf-8") as f:
            docs.append(json.load(f))
    doc = merge(docs)
    with open(argv[0], "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    print(report.to_markdown(doc), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
