"""bench/eval_merge.py: documents of a run split by config merge into the report of one run."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.agent.test_eval_cli import ONE, oracle, repo, run  # noqa: F401 (fixtures)

spec = importlib.util.spec_from_file_location("eval_merge", Path(__file__).parents[2] / "bench" / "eval_merge.py")
eval_merge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(eval_merge)


def without_seconds(doc):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in doc["summary"]]


def test_a_run_split_by_config_merges_into_the_one_run(repo, oracle, tmp_path):  # noqa: F811
    docs = {}
    for name, configs in (("a", "dense"), ("b", "moba-hybrid,moba"), ("all", "dense,moba-hybrid,moba")):
        out = tmp_path / f"{name}.json"
        assert run("eval", repo, *ONE, "--attention", configs, "-o", out).exit_code == 0
        docs[name] = json.loads(out.read_text())
    merged = eval_merge.merge([docs["a"], docs["b"]])
    assert without_seconds(merged) == without_seconds(docs["all"])
    assert merged["baselines"] == docs["all"]["baselines"] and merged["meta"]["complete"] is True
    assert "| moba | -1.00 [-1.00, -1.00] |" in eval_merge.report.to_markdown(merged)
    with pytest.raises(ValueError, match="task results missing"):
        eval_merge.merge([docs["a"], {**docs["b"], "tasks": docs["b"]["tasks"][:3]}])
    with pytest.raises(ValueError, match="documents differ in seed"):
        eval_merge.merge([docs["a"], {**docs["b"], "meta": {**docs["b"]["meta"], "seed": 9}}])


def _old_order_task(doc):
    """The first task of `doc`, its dense answer given citations in the pre-2026-11-30 order: a text
    reference to another file first, then routing citations on the gold lines and elsewhere."""
    t = doc["tasks"][0]
    other = next(p for p in ("zz_other.py", "other.py") if p != t["path"])
    cites = [{"path": other, "start_line": 1, "end_line": 1, "score": 0.0, "source": "text"},
             {"path": t["path"], "start_line": 900, "end_line": 901, "score": 0.2, "source": "routing"},
             {"path": t["path"], "start_line": t["start_line"], "end_line": t["end_line"], "score": 0.5,
              "source": "routing"}]
    t["results"]["dense"].update(citations=cites, rank=2, routing_rank=1, top1_cite=False, top3_cite=True)
    return t


def test_rerank_orders_stored_citations_as_answers_do_now_and_rescores_the_order(repo, oracle, tmp_path):  # noqa: F811
    out = tmp_path / "a.json"
    assert run("eval", repo, *ONE, "--attention", "dense,moba", "-o", out).exit_code == 0
    doc = json.loads(out.read_text())
    _old_order_task(doc)
    kept = eval_merge.merge([doc])["tasks"][0]["results"]["dense"]
    assert (kept["rank"], kept["top1_cite"]) == (2, False)
    r = eval_merge.merge([doc], rerank=True)["tasks"][0]["results"]["dense"]
    assert [c["score"] for c in r["citations"]] == [0.5, 0.2, 0.0]
    assert (r["rank"], r["routing_rank"], r["top1_cite"], r["top3_cite"]) == (1, 1, True, True)


def test_configs_keeps_one_config_to_pool_runs_that_ran_others(repo, oracle, tmp_path):  # noqa: F811
    out = tmp_path / "a.json"
    assert run("eval", repo, *ONE, "--attention", "dense,moba", "-o", out).exit_code == 0
    doc = json.loads(out.read_text())
    pooled = eval_merge.merge([doc], keep=["dense"])
    assert [r["config"] for r in pooled["summary"]] == ["dense"]
    assert all(list(t["results"]) == ["dense"] for t in pooled["tasks"])
    with pytest.raises(ValueError, match="no config of"):
        eval_merge.merge([doc], keep=["moba:block=64"])
