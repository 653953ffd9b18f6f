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
