"""Run the tasks of a workspace under several attention configs on one loaded model, and report.

Per config: the model's MoBA parameters are re-tuned in place (`Runtime.retune`, no reload), a new
Session is opened over the same packed copy (prefilled once, no context cache), then every task is
asked after `session.reset()`, which crops back to the prefilled context. Configs:

- "dense": every layer exact SDPA; the gate is still scored, so its citations are the
  routing-under-dense-attention baseline;
- "moba-hybrid": MoBA with the last layers dense (`hybrid_layers`, default the last 3);
- "moba": MoBA in every layer.

Block size, top-k and sink blocks come from the base AskConfig. Knows no terminal: progress goes
through callbacks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent import citations as cit
from agent.config import AskConfig
from agent.evaluate import scoring
from agent.evaluate.bm25 import BM25
from agent.evaluate.tasks import FUNCTION, Task, Workspace
from agent.session import Session

CONFIG_NAMES = ("dense", "moba-hybrid", "moba")
HYBRID_LAYERS = (-3, -2, -1)
METRICS = ("answer_exact", "repoqa_pass", "hit_at_1", "hit_at_3", "mrr", "line_precision", "line_recall",
           "bogus_citations", "bm25_hit_at_1", "random_hit_at_1")


def parse_configs(text: str) -> list[str]:
    """"dense,moba" -> ["dense", "moba"]. Raises ValueError naming an unknown config or a repeat."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in CONFIG_NAMES]
    if bad or not names:
        raise ValueError(f"unknown attention config {bad[0] if bad else text!r}: use a comma list of "
                         f"{', '.join(CONFIG_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attention config listed twice in {text!r}")
    return names


def config_for(name: str, base: AskConfig, hybrid_layers: tuple[int, ...] = HYBRID_LAYERS) -> AskConfig:
    """The AskConfig of a named config: base with attention and dense layers set, no context cache."""
    if name == "dense":
        return replace(base, attention="dense", dense_layers=(), no_cache=True)
    layers = hybrid_layers if name == "moba-hybrid" else ()
    return replace(base, attention="moba", dense_layers=tuple(layers), no_cache=True)


@dataclass
class Report:
    """The --json document (`doc`: configs and tasks) and what the markdown table adds (`meta`)."""

    doc: dict
    meta: dict


def run(runtime, ws: Workspace, base: AskConfig, names: list[str], *, seed: int,
        hybrid_layers: tuple[int, ...] = HYBRID_LAYERS,
        open_session: Callable[[Session], None] | None = None,
        on_task: Callable[[str, int, int], None] | None = None) -> Report:
    """Ask every task of `ws` under each named config; return the report.

    open_session(session) prefills it (default: session.open()); on_task(config, done, total)
    reports progress. A runtime without `retune` (a test double) keeps its own settings.
    """
    baselines = _baselines(ws, seed)
    results: dict[str, dict[str, dict]] = {t.id: {} for t in ws.tasks}
    configs, extra = [], {}
    for name in names:
        cfg = config_for(name, base, hybrid_layers)
        rows, extra[name] = _run_config(runtime, ws, cfg, name, open_session, on_task)
        for t, row in zip(ws.tasks, rows):
            results[t.id][name] = row
        configs.append(_config_entry(name, cfg, rows, baselines))
    tasks = [_task_entry(t, baselines[t.id], results[t.id]) for t in ws.tasks]
    meta = dict(model=runtime.name, files=len(ws.pack.files), pack_tokens=ws.pack.total_tokens,
                chance=round(1 / len(ws.pack.files), 4), seed=seed, root=ws.source_root, configs=extra)
    return Report({"configs": configs, "tasks": tasks}, meta)


def _run_config(runtime, ws: Workspace, cfg: AskConfig, name: str, open_session, on_task) -> tuple[list, dict]:
    """Re-tune, prefill once, ask every task; (result rows in task order, notes for the table)."""
    if getattr(runtime, "retune", None):
        runtime.retune(cfg)
    session = Session(runtime, ws.pack, cfg, "ask", None)
    (open_session or (lambda s: s.open()))(session)
    needles = [t.code for t in ws.tasks if t.kind == FUNCTION]
    rows, t0 = [], time.perf_counter()
    for i, task in enumerate(ws.tasks):
        if on_task:
            on_task(name, i, len(ws.tasks))
        rows.append(_ask(session, task, ws, needles))
    if on_task:
        on_task(name, len(ws.tasks), len(ws.tasks))
    notes = dict(sink_blocks=cfg.sink_blocks, dense_layers=_layers_label(name, cfg),
                 prefill_s=session.stats["prefill_s"], questions_s=round(time.perf_counter() - t0, 1),
                 context_tokens=session.context_len)
    return rows, notes


def _ask(session: Session, task: Task, ws: Workspace, needles: list[str]) -> dict:
    session.reset()
    t0 = time.perf_counter()
    answer = session.ask(task.question)
    seconds = time.perf_counter() - t0
    out = score_answer(task, answer.text, answer.citations, ws, needles)
    out.update(answer=answer.text, citations=[c.to_dict() for c in answer.citations],
               seconds=round(seconds, 2), answer_tokens=len(answer.tokens))
    return out


def score_answer(task: Task, text: str, citations, ws: Workspace, needles: list[str]) -> dict:
    """Scores of one answer: answer_exact, repoqa_pass and bleu (functions only, else None), rank of
    the gold file among the citations (and among the routing citations alone: routing_rank), line
    precision/recall, bogus citation count.

    answer_exact: for a function, its name appears as an identifier in the answer; for a class or
    constant, the answer has a path:line reference (resolved by the source map) covering the gold line.
    """
    if task.kind == FUNCTION:
        exact = scoring.names_identifier(text, task.name)
        passed, bleu = scoring.repoqa_pass(text, task.code, needles)
    else:
        refs = cit.from_text(text, ws.pack.source_map)
        exact = any(c.path == task.path and c.start_line <= task.start_line <= c.end_line for c in refs)
        passed, bleu = None, None
    rank = scoring.gold_rank(citations, task.path)
    routed = scoring.gold_rank([c for c in citations if c.source != cit.TEXT], task.path)
    precision, recall = scoring.line_scores(citations, task.path, task.start_line, task.end_line)
    return dict(answer_exact=exact, repoqa_pass=passed, bleu=None if bleu is None else round(bleu, 4),
                rank=rank, routing_rank=routed, line_precision=round(precision, 4), line_recall=round(recall, 4),
                bogus=scoring.bogus_count(citations, ws.pack.source_map))


def _baselines(ws: Workspace, seed: int) -> dict[str, dict]:
    """Per task: the gold file's BM25 rank (question vs whole files) and a seeded random file."""
    bm25 = BM25(ws.texts)
    files = [f.path for f in ws.pack.files]
    out = {}
    for t in ws.tasks:
        ranking = bm25.rank(t.question)
        pick = random.Random(f"{seed}:random:{t.id}").choice(files)
        out[t.id] = dict(bm25_rank=ranking.index(t.path) + 1 if t.path in ranking else None,
                         random_file=pick, gold=t.path)
    return out


def _config_entry(name: str, cfg: AskConfig, rows: list[dict], baselines: dict[str, dict]) -> dict:
    base = list(baselines.values())
    ranks = [r["rank"] for r in rows]
    metrics = {
        "answer_exact": scoring.mean(r["answer_exact"] for r in rows),
        "repoqa_pass": scoring.mean(r["repoqa_pass"] for r in rows),
        "hit_at_1": scoring.mean(scoring.hit_at(k, 1) for k in ranks),
        "hit_at_3": scoring.mean(scoring.hit_at(k, 3) for k in ranks),
        "mrr": scoring.mean(scoring.reciprocal_rank(k) for k in ranks),
        "line_precision": scoring.mean(r["line_precision"] for r in rows),
        "line_recall": scoring.mean(r["line_recall"] for r in rows),
        "bogus_citations": sum(r["bogus"] for r in rows),
        "bm25_hit_at_1": scoring.mean(scoring.hit_at(b["bm25_rank"], 1) for b in base),
        "random_hit_at_1": scoring.mean(_random_hit(b) for b in base),
    }
    metrics = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    return {"name": name, "attention": cfg.attention, "block_size": cfg.block_size, "top_k": cfg.top_k,
            "metrics": metrics}


def _random_hit(b: dict) -> float:
    return 1.0 if b["random_file"] == b["gold"] else 0.0


def _task_entry(t: Task, baseline: dict, results: dict[str, dict]) -> dict:
    return {"id": t.id, "kind": t.kind, "name": t.name, "path": t.path, "start_line": t.start_line,
            "end_line": t.end_line, "depth": t.depth, "question": t.question,
            "bm25_rank": baseline["bm25_rank"], "random_file": baseline["random_file"], "results": results}


def _layers_label(name: str, cfg: AskConfig) -> str:
    if name == "dense":
        return "all"
    return ",".join(str(x) for x in cfg.dense_layers) or "none"


def to_markdown(report: Report) -> str:
    """A line of context, the summary table, and one row per task (exact match, gold-file rank)."""
    m, tasks = report.meta, report.doc["tasks"]
    kinds = {k: sum(t["kind"] == k for t in tasks) for k in ("function", "class", "constant")}
    head = (f"moba-ask eval: {m['root']}, model {m['model']}, {m['pack_tokens']:,} pack tokens, {m['files']} files, "
            f"{len(tasks)} tasks ({kinds['function']} function, {kinds['class']} class, {kinds['constant']} "
            f"constant), seed {m['seed']}")
    note = (f"Chance hit@1 (1/#files): {m['chance']}. Per task, each config shows answer exact (Y/n) and the gold "
            "file's rank among the citations (- when not cited):")
    return "\n".join([head, "", *_summary_table(report), "", note, "", *_task_table(report)]) + "\n"


def _summary_table(report: Report) -> list[str]:
    lines = ["| config | attention | block | top-k | sinks | dense layers | prefill s | answer exact | RepoQA pass "
             "| hit@1 | hit@3 | MRR | line P | line R | bogus | BM25 hit@1 | random hit@1 |", "|" + "---|" * 17]
    for c in report.doc["configs"]:
        x, mt = report.meta["configs"][c["name"]], c["metrics"]
        cells = [c["name"], c["attention"], c["block_size"], c["top_k"], x["sink_blocks"], x["dense_layers"],
                 f"{x['prefill_s']:.1f}", *(_fmt(mt[k]) for k in METRICS)]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return lines


def _task_table(report: Report) -> list[str]:
    names = [c["name"] for c in report.doc["configs"]]
    lines = ["| task | gold | depth | BM25 rank | " + " | ".join(names) + " |", "|" + "---|" * (4 + len(names))]
    for t in report.doc["tasks"]:
        cells = [f"{t['id']} `{t['name']}`", f"{t['path']}:{t['start_line']}-{t['end_line']}", t["depth"],
                 t["bm25_rank"] or "-", *(_task_cell(t["results"][n]) for n in names)]
        lines.append("| " + " | ".join(str(v) for v in cells) + " |")
    return lines


def _task_cell(r: dict) -> str:
    return f"{'Y' if r['answer_exact'] else 'n'} {r['rank'] or '-'}"


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return str(v) if isinstance(v, int) else f"{v:.3f}"
