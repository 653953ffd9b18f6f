"""Run the tasks of several workspaces (a repository at a context size each) under several attention
configs on one loaded model, and score every answer.

Per workspace and config: the model's MoBA parameters are re-tuned in place (`Runtime.retune`, no
reload), a Session is opened over the workspace's packed copy (prefilled once, no context cache),
then every task is asked after `session.reset()`, which crops back to the prefilled context. The
configs come from `configs.parse_specs`; the base AskConfig gives what a config leaves unset.
Aggregation and rendering live in `report`. Knows no terminal: progress goes through a callback.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent import citations as cit
from agent.config import AskConfig
from agent.evaluate import scoring
from agent.evaluate.baselines import task_baselines
from agent.evaluate.configs import ConfigSpec
from agent.evaluate.tasks import CALLER, FUNCTION, Task, Workspace
from agent.session import Session


@dataclass(frozen=True)
class Unit:
    """One repository (repo: its label in the reports) packed at one context size."""

    repo: str
    context_tokens: int
    ws: Workspace


def units_at(size: int, paths: list[str], labels: list[str], n_tasks: int, make) -> tuple[list[Unit], int]:
    """The units of `paths` at one context size, and how many of n_tasks no repository could give.

    Each repository is asked for ceil(n_tasks / repositories) tasks (make(path, label, size, n_tasks=k) -> a
    Workspace); what some lack is asked again of those that had enough, until n_tasks are there or no
    repository has more."""
    quota = [math.ceil(n_tasks / len(paths))] * len(paths)
    built: list = [None] * len(paths)
    todo = list(range(len(paths)))
    while True:
        for i in todo:
            built[i] = make(paths[i], labels[i], size, n_tasks=quota[i])
        short = n_tasks - sum(len(ws.tasks) for ws in built)
        todo = [i for i, ws in enumerate(built) if len(ws.tasks) == quota[i]]
        if short <= 0 or not todo:
            break
        for i in todo:
            quota[i] += math.ceil(short / len(todo))
    return [Unit(label, size, ws) for label, ws in zip(labels, built)], short


def labels(paths: list[str]) -> list[str]:
    """Each repository's name in the reports: its directory name, made unique with #2, #3..."""
    names = [os.path.basename(os.path.abspath(p)) or p for p in paths]
    return [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]


def run(runtime, units: list[Unit], base: AskConfig, specs: list[ConfigSpec], *, seed: int,
        open_session: Callable[[Session], None] | None = None,
        on_task: Callable[[Unit, str, int, int], None] | None = None,
        on_unit: Callable[[list[dict], list[dict]], None] | None = None,
        keep: Callable | None = None) -> tuple[list[dict], list[dict]]:
    """Ask every task of every unit under each config.

    Returns (tasks, timings): one entry per task (its gold, baselines and per-config results) and one
    per (unit, config) with prefill and question seconds. open_session(session) prefills (default
    session.open()); on_task(unit, config, done, total) reports progress; on_unit(tasks, timings) gets
    the results so far each time a unit is done under every config; keep(repo, context_tokens, config,
    task id, session, answer) sees every answer (`evidence.EvidenceLog.keep`). A runtime without `retune`
    (a test double) keeps its own settings.
    """
    tasks, timings = [], []
    for unit in units:
        base_rows = task_baselines(unit.ws.texts, unit.ws.tasks, seed)
        results: dict[str, dict[str, dict]] = {t.id: {} for t in unit.ws.tasks}
        for spec in specs:
            rows, timing = _run_config(runtime, unit, spec.apply(base), spec.name, open_session, on_task, keep)
            timings.append(dict(repo=unit.repo, context_tokens=unit.context_tokens, config=spec.name, **timing))
            for t, row in zip(unit.ws.tasks, rows):
                results[t.id][spec.name] = row
        tasks += [_task_entry(unit, t, base_rows[t.id], results[t.id]) for t in unit.ws.tasks]
        if on_unit:
            on_unit(tasks, timings)
    return tasks, timings


def _run_config(runtime, unit: Unit, cfg: AskConfig, name: str, open_session, on_task,
                keep=None) -> tuple[list, dict]:
    """Re-tune, prefill once, ask every task; (result rows in task order, timing)."""
    if getattr(runtime, "retune", None):
        runtime.retune(cfg)
    ws = unit.ws
    session = Session(runtime, ws.pack, cfg, "ask", None)
    (open_session or (lambda s: s.open()))(session)
    needles = [t.code for t in ws.tasks if t.kind == FUNCTION]
    rows, t0 = [], time.perf_counter()
    for i, task in enumerate(ws.tasks):
        if on_task:
            on_task(unit, name, i, len(ws.tasks))
        rows.append(_ask(session, task, ws, needles,
                         keep and (lambda s, a, t=task: keep(unit.repo, unit.context_tokens, name, t.id, s, a))))
    if on_task:
        on_task(unit, name, len(ws.tasks), len(ws.tasks))
    timing = dict(prefill_s=session.stats["prefill_s"], questions_s=round(time.perf_counter() - t0, 2),
                  questions=len(ws.tasks), context_tokens_prefilled=session.context_len)
    return rows, timing


def _ask(session: Session, task: Task, ws: Workspace, needles: list[str], keep=None) -> dict:
    session.reset()
    t0 = time.perf_counter()
    answer = session.ask(task.question)
    seconds = time.perf_counter() - t0
    if keep:
        keep(session, answer)
    out = score_answer(task, answer.text, answer.citations, ws, needles)
    out.update(answer=answer.text, citations=[c.to_dict() for c in answer.citations],
               seconds=round(seconds, 2), answer_tokens=len(answer.tokens))
    return out


def score_answer(task: Task, text: str, citations, ws: Workspace, needles: list[str]) -> dict:
    """Scores of one answer.

    answer_exact: for a function needle or a caller task, the gold name appears as an identifier in
    the answer; for a class or constant, the answer has a path:line reference (resolved by the source
    map) covering the gold line. repoqa_pass and bleu: function needles only, else None. rank /
    routing_rank: the gold file among all citations / the routing citations alone. top1_cite,
    top3_cite: the first routing citation / one of the first three (citation order = strength)
    overlaps the gold lines. Line precision/recall over all citations; bogus: unresolvable citations.
    """
    if task.kind in (FUNCTION, CALLER):
        exact = scoring.names_identifier(text, task.name)
    else:
        refs = cit.from_text(text, ws.pack.source_map)
        exact = any(c.path == task.path and c.start_line <= task.start_line <= c.end_line for c in refs)
    passed, bleu = scoring.repoqa_pass(text, task.code, needles) if task.kind == FUNCTION else (None, None)
    return dict(answer_exact=exact, repoqa_pass=passed, bleu=None if bleu is None else round(bleu, 4),
                **citation_scores(citations, task.path, task.start_line, task.end_line, ws.pack.source_map))


def citation_scores(citations, path: str, start: int, end: int, source_map) -> dict:
    """The citation part of `score_answer` for gold lines start..end of `path`."""
    precision, recall = scoring.line_scores(citations, path, start, end)
    return dict(**order_scores(citations, path, start, end),
                line_precision=round(precision, 4), line_recall=round(recall, 4),
                bogus=scoring.bogus_count(citations, source_map))


def order_scores(citations, path: str, start: int, end: int) -> dict:
    """The scores that depend on the citations' order: the gold file's rank among all of them and among
    the routing ones, and whether the first / one of the first three routing citations hits the gold lines."""
    routed = [c for c in citations if c.source != cit.TEXT]
    overlaps = [scoring.overlaps(c, path, start, end) for c in routed[:3]]
    return dict(rank=scoring.gold_rank(citations, path), routing_rank=scoring.gold_rank(routed, path),
                top1_cite=overlaps[:1] == [True], top3_cite=any(overlaps))


def _task_entry(unit: Unit, t: Task, baseline: dict, results: dict[str, dict]) -> dict:
    return {"id": t.id, "repo": unit.repo, "context_tokens": unit.context_tokens, "kind": t.kind, "name": t.name,
            "path": t.path, "start_line": t.start_line, "end_line": t.end_line, "depth": t.depth,
            "question": t.question, **{k: v for k, v in baseline.items() if k != "gold"}, "results": results}
