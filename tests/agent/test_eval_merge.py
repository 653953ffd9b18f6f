"""bench/eval_merge.py: runs of the same tasks in separate processes merge into one report with the
paired difference against dense; runs over different tasks are refused."""

import pytest

from agent.evaluate import report
from bench.eval_merge import merge


def _row(answer: bool) -> dict:
    return dict(answer_exact=answer, repoqa_pass=None, bleu=None, rank=1 if answer else None, routing_rank=None,
                top1_cite=answer, top3_cite=answer, line_precision=1.0 if answer else 0.0, line_recall=0.0, bogus=0)


def _doc(config: str, answers: list[bool], question: str = "q") -> dict:
    tasks = [dict(id=f"t{i}", repo="r", context_tokens=100, kind="function", name="f", path="a.py", start_line=1,
                  end_line=2, depth=0.5, question=f"{question}{i}", bm25_rank=1, bm25_fn_top1=1.0, bm25_fn_top3=1.0,
                  random_file="a.py", results={config: _row(a)}) for i, a in enumerate(answers)]
    timings = [dict(repo="r", context_tokens=100, config=config, prefill_s=1.0, questions_s=2.0, questions=len(answers))]
    return report.build(tasks, timings, [config], dict(model="m", configs=[dict(name=config)]), seed=0)


def test_merged_runs_get_the_paired_difference():
    dense = _doc("dense", [True] * 10)
    moba = _doc("moba", [True] * 5 + [False] * 5)
    doc = merge([moba, dense])
    rows = {r["config"]: r for r in doc["summary"]}
    assert list(rows) == ["dense", "moba"]
    assert rows["moba"]["metrics"]["answer"]["value"] == pytest.approx(0.5)
    assert rows["moba"]["diff_vs_dense"]["answer"]["value"] == pytest.approx(-0.5)
    assert rows["dense"]["diff_vs_dense"] == {}


def test_runs_over_other_tasks_are_refused():
    with pytest.raises(ValueError, match="different task sets"):
        merge([_doc("dense", [True] * 3), _doc("moba", [True] * 4)])
    with pytest.raises(ValueError, match="different questions"):
        merge([_doc("dense", [True] * 3), _doc("moba", [True] * 3, question="other")])
