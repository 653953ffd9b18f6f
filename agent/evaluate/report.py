"""Aggregate the scored tasks of `runner.run` into the eval's JSON document and markdown report.

Per context size and config, over the tasks of every repository: each rate as a mean with a bootstrap
95% interval (`stats.bootstrap`), and for every config other than "dense" the paired difference
against dense on the same tasks (`stats.paired`); bogus citations as a count; seconds of prefill and
questions. Two comparisons the quality targets are written in: the answers of a config as a share of
dense's on the same tasks (`stats.paired_ratio`), and its file hit@1 minus BM25's over files, paired.
The baselines (BM25 over files and over function chunks, a random file) depend on no config and get a
row of their own. Per repository the point values are kept too. Bootstrap seeds
derive from the run's seed, the context size and the metric, so that every config of a size is
resampled on the same task indices. Knows no models and no terminal.
"""

from __future__ import annotations

import zlib

from agent.evaluate import scoring, stats

DENSE = "dense"
RATES = {  # name -> (markdown label, per-task value from a result row)
    "answer": ("answer", lambda r: float(r["answer_exact"])),
    "hit_at_1": ("hit@1", lambda r: scoring.hit_at(r["rank"], 1)),
    "hit_at_3": ("hit@3", lambda r: scoring.hit_at(r["rank"], 3)),
    "top1_cite": ("top-1 cite", lambda r: float(r["top1_cite"])),
    "top3_cite": ("top-3 cite", lambda r: float(r["top3_cite"])),
    "line_precision": ("line P", lambda r: r["line_precision"]),
    "routing_hit_at_1": ("routing hit@1", lambda r: scoring.hit_at(r["routing_rank"], 1)),
    "routing_hit_at_3": ("routing hit@3", lambda r: scoring.hit_at(r["routing_rank"], 3)),
    "mrr": ("MRR", lambda r: scoring.reciprocal_rank(r["rank"])),
    "line_recall": ("line R", lambda r: r["line_recall"]),
    "repoqa_pass": ("RepoQA pass", lambda r: None if r["repoqa_pass"] is None else float(r["repoqa_pass"])),
}
HEADLINE = ("answer", "hit_at_1", "hit_at_3", "top1_cite", "top3_cite", "line_precision")
BASELINES = {  # name -> (markdown label, per-task value from a task entry)
    "bm25_hit_at_1": ("BM25 file hit@1", lambda t: scoring.hit_at(t["bm25_rank"], 1)),
    "bm25_fn_top1": ("BM25 function top-1", lambda t: t["bm25_fn_top1"]),
    "bm25_fn_top3": ("BM25 function top-3", lambda t: t["bm25_fn_top3"]),
    "random_hit_at_1": ("random file hit@1", lambda t: float(t["random_file"] == t["path"])),
}


def build(tasks: list[dict], timings: list[dict], configs: list[str], meta: dict, seed: int) -> dict:
    """The JSON document: meta, summary (per size and config), baselines (per size), repos (per size,
    repository and config), timings and tasks."""
    sizes = sorted({t["context_tokens"] for t in tasks})
    summary, baselines, repos = [], [], []
    for size in sizes:
        at = [t for t in tasks if t["context_tokens"] == size]
        baselines.append(dict(context_tokens=size, n=len(at), metrics=_baseline_metrics(at, seed, size)))
        for name in configs:
            summary.append(_summary_row(at, name, configs, timings, seed, size))
        for repo in dict.fromkeys(t["repo"] for t in at):
            mine = [t for t in at if t["repo"] == repo]
            repos += [_repo_row(mine, repo, size, name, timings) for name in configs]
    return dict(meta=dict(meta, seed=seed, resamples=stats.RESAMPLES, level=stats.LEVEL), summary=summary,
                baselines=baselines, repos=repos, timings=timings, tasks=tasks)


def _seed(seed: int, size: int, metric: str) -> int:
    return zlib.crc32(f"{seed}:{size}:{metric}".encode())


def _values(tasks: list[dict], name: str, metric: str) -> list:
    return [RATES[metric][1](t["results"][name]) for t in tasks]


def _summary_row(tasks, name, configs, timings, seed, size) -> dict:
    metrics = {m: stats.bootstrap(_values(tasks, name, m), _seed(seed, size, m)).to_dict() for m in RATES}
    diff = {}
    if name != DENSE and DENSE in configs:
        diff = {m: stats.paired(_values(tasks, name, m), _values(tasks, DENSE, m), _seed(seed, size, m)).to_dict()
                for m in RATES}
    return dict(context_tokens=size, config=name, n=len(tasks), metrics=metrics, diff_vs_dense=diff,
                targets=_targets(tasks, name, configs, seed, size),
                bogus=sum(t["results"][name]["bogus"] for t in tasks), seconds=_seconds(timings, size, name))


def _targets(tasks, name, configs, seed, size) -> dict:
    """answer_vs_dense: this config's correct answers / dense's on the same tasks (absent for dense or without
    it); hit1_minus_bm25: file hit@1 minus BM25's file hit@1, paired over tasks."""
    bm25 = [BASELINES["bm25_hit_at_1"][1](t) for t in tasks]
    out = {"hit1_minus_bm25": stats.paired(_values(tasks, name, "hit_at_1"), bm25,
                                           _seed(seed, size, "hit1_minus_bm25")).to_dict()}
    if name != DENSE and DENSE in configs:
        out["answer_vs_dense"] = stats.paired_ratio(_values(tasks, name, "answer"), _values(tasks, DENSE, "answer"),
                                                    _seed(seed, size, "answer_vs_dense")).to_dict()
    return out


def _baseline_metrics(tasks, seed, size) -> dict:
    return {m: stats.bootstrap([f(t) for t in tasks], _seed(seed, size, m)).to_dict()
            for m, (_, f) in BASELINES.items()}


def _repo_row(tasks, repo, size, name, timings) -> dict:
    metrics = {m: _round(scoring.mean(_values(tasks, name, m))) for m in RATES}
    return dict(repo=repo, context_tokens=size, config=name, n=len(tasks), metrics=metrics,
                bogus=sum(t["results"][name]["bogus"] for t in tasks),
                seconds=_seconds([x for x in timings if x["repo"] == repo], size, name))


def _seconds(timings, size, name) -> dict:
    mine = [x for x in timings if x["context_tokens"] == size and x["config"] == name]
    prefill, questions = sum(x["prefill_s"] for x in mine), sum(x["questions_s"] for x in mine)
    n = sum(x["questions"] for x in mine)
    return dict(prefill_s=round(prefill, 2), questions_s=round(questions, 2),
                per_question_s=round(questions / n, 3) if n else None)


def _round(v):
    return None if v is None else round(v, 4)


def to_markdown(doc: dict) -> str:
    """Head, the repositories, then per context size: the summary with intervals, the paired
    differences against dense, the baselines, per repository point values and one row per task."""
    m = doc["meta"]
    yarn = f" with YaRN rope x{m['rope_yarn']:g}" if m.get("rope_yarn", 1) != 1 else ""
    out = [f"moba-ask eval: model {m['model']}{yarn}, {len(m['repos'])} workspace(s), seed {m['seed']}; rates are means "
           f"over tasks with bootstrap {m['level']:.0%} intervals ({m['resamples']} resamples, percentile)", "",
           *_repo_table(m["repos"])]
    configs = [c["name"] for c in m["configs"]]
    for base in doc["baselines"]:
        size = base["context_tokens"]
        out += ["", f"## {size:,} context tokens, {base['n']} tasks", "", *_summary_table(doc, size)]
        if any(r["diff_vs_dense"] for r in doc["summary"] if r["context_tokens"] == size):
            out += ["", "Paired difference against dense on the same tasks (config - dense):", "",
                    *_diff_table(doc, size)]
        out += ["", "Answers as a share of dense's on the same tasks, and file hit@1 over BM25's (paired):", "",
                *_target_table(doc, size)]
        out += ["", "Baselines (no model):", "", *_baseline_table(base), "", "Per repository (point values):", "",
                *_per_repo_table(doc, size), "",
                "Per task, each config: answer (Y/n), the gold file's rank among the citations (- not cited), "
                "top-1/top-3 routing citation on the gold lines (1/3/-):", "", *_task_table(doc, size, configs)]
    return "\n".join(out) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _repo_table(repos: list[dict]) -> list[str]:
    lines = ["| repository | context | files | pack tokens | tasks | function / class+constant / caller |",
             "|---|---|---|---|---|---|"]
    for r in repos:
        k = r["kinds"]
        lines.append(_row([r["repo"], f"{r['context_tokens']:,}", r["files"], f"{r['pack_tokens']:,}", r["tasks"],
                           f"{k['function']} / {k['class'] + k['constant']} / {k['caller']}"]))
    return lines


def _summary_table(doc: dict, size: int) -> list[str]:
    heads = [RATES[m][0] for m in HEADLINE]
    lines = [_row(["config", *heads, "bogus", "prefill s", "s/question"]), "|" + "---|" * (len(heads) + 4)]
    for r in doc["summary"]:
        if r["context_tokens"] == size:
            cells = [stats.Estimate(**_est(r["metrics"][m])).cell() for m in HEADLINE]
            s = r["seconds"]
            lines.append(_row([r["config"], *cells, r["bogus"], f"{s['prefill_s']:.1f}", s["per_question_s"]]))
    return lines


def _diff_table(doc: dict, size: int) -> list[str]:
    lines = [_row(["config", *(RATES[m][0] for m in HEADLINE)]), "|" + "---|" * (len(HEADLINE) + 1)]
    for r in doc["summary"]:
        if r["context_tokens"] == size and r["diff_vs_dense"]:
            lines.append(_row([r["config"], *(stats.Estimate(**_est(r["diff_vs_dense"][m])).cell(signed=True)
                                               for m in HEADLINE)]))
    return lines


def _target_table(doc: dict, size: int) -> list[str]:
    lines = [_row(["config", "answers / dense's", "hit@1 - BM25 hit@1"]), "|---|---|---|"]
    for r in doc["summary"]:
        if r["context_tokens"] == size and r.get("targets"):
            t = r["targets"]
            ratio = stats.Estimate(**_est(t["answer_vs_dense"])).cell() if "answer_vs_dense" in t else "-"
            lines.append(_row([r["config"], ratio, stats.Estimate(**_est(t["hit1_minus_bm25"])).cell(signed=True)]))
    return lines


def _baseline_table(base: dict) -> list[str]:
    return [_row([label for label, _ in BASELINES.values()]), "|" + "---|" * len(BASELINES),
            _row([stats.Estimate(**_est(base["metrics"][m])).cell() for m in BASELINES])]


def _per_repo_table(doc: dict, size: int) -> list[str]:
    lines = [_row(["repository", "config", "n", *(RATES[m][0] for m in HEADLINE), "bogus"]),
             "|" + "---|" * (len(HEADLINE) + 4)]
    for r in doc["repos"]:
        if r["context_tokens"] == size:
            vals = ["n/a" if r["metrics"][m] is None else f"{r['metrics'][m]:.2f}" for m in HEADLINE]
            lines.append(_row([r["repo"], r["config"], r["n"], *vals, r["bogus"]]))
    return lines


def _task_table(doc: dict, size: int, configs: list[str]) -> list[str]:
    lines = [_row(["task", "gold", "depth", "BM25 rank", *configs]), "|" + "---|" * (4 + len(configs))]
    for t in doc["tasks"]:
        if t["context_tokens"] == size:
            lines.append(_row([f"{t['repo']} {t['id']} `{t['name']}`", f"{t['path']}:{t['start_line']}-{t['end_line']}",
                               t["depth"], t["bm25_rank"] or "-", *(_task_cell(t["results"][n]) for n in configs)]))
    return lines


def _task_cell(r: dict) -> str:
    top = "1" if r["top1_cite"] else "3" if r["top3_cite"] else "-"
    return f"{'Y' if r['answer_exact'] else 'n'} {r['rank'] or '-'} {top}"


def _est(d: dict) -> dict:
    return dict(value=d["value"], lo=d["ci"][0], hi=d["ci"][1], n=d["n"])
