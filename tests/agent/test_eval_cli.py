"""`moba-ask eval` through the real CLI with an oracle runtime: a real tiny tokenizer, real packing,
sessions, citations and scoring; the engine replays per-question answers and routing that depend on
the attention config, so that every metric has a known value."""

import bisect
import json

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.evaluate.runner import METRICS
from agent.evaluate.tasks import FUNCTION, build_workspace
from tests.agent.fakes import FakeEngine, FakeRuntime
from tests.agent.test_eval_tasks import make_repo
from tests.ingest.fixtures import snapshot, write_tree

ARGS = ["--block-size", "64", "--max-new-tokens", "4000", "--tasks", "9", "--seed", "3", "--context-tokens", "20000"]


class OracleEngine(FakeEngine):
    """Routes to the oracle's current target; a question turn picks the answer and the target."""

    def __init__(self, runtime, capacity):
        super().__init__(runtime, capacity)
        self.found: dict[str, int] = {}

    def prefill(self, ids, progress=None):
        if self.ids:
            self.rt.question_turn(self.rt.tokenizer.decode(list(ids)))
        return super().prefill(ids, progress)

    def _target(self):
        target = self.rt.target
        if target not in self.found:
            pieces = [self.rt.tokenizer.decode([i]) for i in self.ids]
            ends, total = [], 0
            for p in pieces:
                total += len(p)
                ends.append(total)
            at = "".join(pieces).find(target)
            self.found[target] = bisect.bisect_left(ends, at + len(target)) if at >= 0 else None
        return self.found[target]


class Oracle(FakeRuntime):
    """dense: right answer, path:line refs and a code block, routing at the gold definition;
    moba-hybrid: the bare name, routing at the README; moba: no answer, routing at the gold."""

    def __init__(self, tasks):
        super().__init__(block_size=64, max_positions=32768)
        self.tasks, self.mode, self.retuned = tasks, None, []
        self.retune = self._retune

    def _retune(self, cfg):
        self.retuned.append((cfg.attention, cfg.dense_layers, cfg.block_size, cfg.no_cache))
        self.mode = "dense" if cfg.attention == "dense" else "hybrid" if cfg.dense_layers else "moba"

    def _make(self, capacity):
        self.engines.append(OracleEngine(self, capacity))
        return self.engines[-1]

    def question_turn(self, text):
        (t,) = [t for t in self.tasks if t.question in text]
        marker = {"function": f"def {t.name}(", "class": f"class {t.name}:", "constant": f"{t.name} = "}[t.kind]
        self.target = "# Fixture" if self.mode == "hybrid" else marker
        if self.mode == "dense":
            code = f"\n```python\n{t.code}\n```" if t.kind == FUNCTION else ""
            self.answers = [f"It is `{t.name}` in {t.path}:{t.start_line}-{t.end_line}.{code}"]
        else:
            self.answers = [f"It is `{t.name}`." if self.mode == "hybrid" else "I cannot tell."]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    return make_repo(tmp_path / "repo")


@pytest.fixture
def oracle(repo, monkeypatch):
    rt = Oracle(())
    ws = build_workspace(str(repo), rt.tokenizer, context_tokens=20000, n_tasks=9, seed=3)
    rt.tasks = ws.tasks
    monkeypatch.setattr("agent.commands.common.load_runtime", lambda cfg: rt)
    return rt


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_json_schema_and_known_metric_values(repo, oracle):
    r = run("eval", repo, "--json", *ARGS)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"configs", "tasks"}
    assert [c["name"] for c in doc["configs"]] == ["dense", "moba-hybrid", "moba"]
    for c in doc["configs"]:
        assert set(c) == {"name", "attention", "block_size", "top_k", "metrics"}
        assert set(c["metrics"]) == set(METRICS) and (c["block_size"], c["top_k"]) == (64, 6)
    dense, hybrid, moba = (c["metrics"] for c in doc["configs"])
    assert {k: dense[k] for k in METRICS[:7]} == dict.fromkeys(METRICS[:7], 1.0)
    assert hybrid["answer_exact"] == pytest.approx(6 / 9, abs=1e-4)  # the name only: functions yes, defs no
    assert hybrid["repoqa_pass"] == hybrid["hit_at_3"] == hybrid["mrr"] == hybrid["line_recall"] == 0.0
    assert moba["answer_exact"] == moba["repoqa_pass"] == 0.0
    assert moba["hit_at_1"] == moba["mrr"] == moba["line_precision"] == 1.0
    assert moba["line_recall"] == pytest.approx((6 * 1 / 4 + 3 * 1) / 9, abs=1e-4)  # the def line of 4
    assert all(c["metrics"]["bogus_citations"] == 0 for c in doc["configs"])
    assert len({(c["metrics"]["bm25_hit_at_1"], c["metrics"]["random_hit_at_1"]) for c in doc["configs"]}) == 1
    assert [(a, d) for a, d, *_ in oracle.retuned] == [("dense", ()), ("moba", (-3, -2, -1)), ("moba", ())]
    assert all(nc and bs == 64 for *_, bs, nc in oracle.retuned)


def test_one_prefill_per_config_and_every_task_reported(repo, oracle):
    doc = json.loads(run("eval", repo, "--json", *ARGS).stdout)
    assert len(oracle.engines) == 3
    for eng in oracle.engines:
        assert eng.prefills[0] > 1000 and len(eng.prefills) == 1 + 9 and max(eng.prefills[1:]) < 300
    assert [t["id"] for t in doc["tasks"]] == [t.id for t in oracle.tasks]
    t = doc["tasks"][0]
    assert {"id", "kind", "name", "path", "start_line", "end_line", "depth", "question", "bm25_rank",
            "random_file", "results"} <= set(t)
    res = t["results"]["dense"]
    assert res["rank"] == 1 and res["bogus"] == 0 and res["citations"][0]["path"] == t["path"]


def test_markdown_table_progress_notes_and_output_file(repo, oracle, tmp_path):
    before = snapshot(repo)
    out = tmp_path / "run.json"
    r = run("eval", repo, *ARGS, "--attention", "dense,moba", "-o", out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("moba-ask eval: ") and "9 tasks (6 function" in lines[0]
    assert "| config | attention | block | top-k | sinks | dense layers |" in r.stdout
    assert any(ln.startswith("| dense | dense | 64 | 6 | 1 | all |") for ln in lines)
    assert any(ln.startswith("| moba | moba | 64 | 6 | 1 | none |") for ln in lines)
    assert "moba-hybrid" not in r.stdout and sum(ln.startswith("| 0") for ln in lines) == 9
    assert "9 tasks (6 function" in r.stderr and "dense: 9 questions in" in r.stderr
    saved = json.loads(out.read_text())
    assert [c["name"] for c in saved["configs"]] == ["dense", "moba"] and saved["meta"]["files"] == 6  # *.py only
    assert snapshot(repo) == before


@pytest.mark.parametrize("args,code,message", [
    (["--attention", "dense,flash"], 2, "unknown attention config 'flash'"),
    (["--attention", "moba,moba"], 2, "listed twice"),
    (["--hybrid-layers", "x"], 2, "dense layers must be"),
    (["--context-tokens", "40000"], 2, "use at most 32,192"),
])
def test_bad_flags_are_one_line_errors(repo, oracle, args, code, message):
    r = run("eval", repo, *args)
    assert r.exit_code == code and message in r.stderr and "Traceback" not in r.stderr


def test_bad_paths_are_one_line_errors(tmp_path, oracle):
    r = run("eval", tmp_path / "missing")
    assert r.exit_code == 1 and "path not found" in r.stderr
    f = write_tree(tmp_path / "t", {"a.py": "x = 1\n"}) / "a.py"
    r = run("eval", f)
    assert r.exit_code == 2 and "PATH must be a directory" in r.stderr
    docs = write_tree(tmp_path / "docs", {"README.md": "# words\n"})
    r = run("eval", docs)
    assert r.exit_code == 1 and "no files to pack" in r.stderr
    r = run("eval", tmp_path / "t")
    assert r.exit_code == 1 and "no Python functions with docstrings" in r.stderr
