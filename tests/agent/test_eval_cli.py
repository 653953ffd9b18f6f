"""`moba-ask eval` through the real CLI with an oracle runtime: a real tiny tokenizer, real packing,
sessions, citations and scoring; the engine replays per-question answers and routing that depend on
the attention config, so that every metric has a known value."""

import bisect
import json

import pytest
from click.testing import CliRunner

from agent.cli import cli
from agent.commands import common
from agent.evaluate.report import HEADLINE, RATES
from agent.evaluate.tasks import FUNCTION, build_workspace
from tests.agent.fakes import FakeEngine, FakeRuntime
from tests.agent.test_eval_tasks import make_repo
from tests.ingest.fixtures import snapshot, write_tree

ARGS = ["--block-size", "64", "--max-new-tokens", "4000", "--seed", "3", "--attention", "dense,moba-hybrid,moba"]
ONE = [*ARGS, "--tasks", "9", "--context-tokens", "20000"]


class OracleEngine(FakeEngine):
    """Routes to the oracle's current target; a question turn picks the answer and the target."""

    def __init__(self, runtime, capacity, params=None):
        super().__init__(runtime, capacity, params)
        self.found: dict[str, int] = {}

    def prefill(self, ids, progress=None, logits=True):
        if self.ids:
            self.rt.question_turn(self.rt.tokenizer.decode(list(ids)))
        return super().prefill(ids, progress, logits)

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
    moba-hybrid: the bare name, routing at the README; moba: no answer, routing at the gold.
    Questions are matched to tasks by text (two copies of the fixture ask the same questions)."""

    def __init__(self, tasks):
        super().__init__(block_size=64, max_positions=32768)
        self.tasks, self.mode, self.retuned = tasks, None, []
        self.retune = self._retune

    def _retune(self, cfg):
        self.retuned.append((cfg.attention, cfg.dense_layers, cfg.block_size, cfg.no_cache))
        self.mode = "dense" if cfg.attention == "dense" else "hybrid" if cfg.dense_layers else "moba"

    def _make(self, capacity, params=None):
        self.engines.append(OracleEngine(self, capacity, params))
        return self.engines[-1]

    def question_turn(self, text):
        t = next(t for t in self.tasks if t.question in text)
        marker = {"function": f"def {t.name}(", "caller": f"def {t.name}(", "class": f"class {t.name}:",
                  "constant": f"{t.name} = "}[t.kind]
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
    monkeypatch.setattr("agent.runtime.load_runtime", lambda cfg: rt)
    return rt


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_json_known_metric_values_intervals_and_paired_differences(repo, oracle):
    r = run("eval", repo, "--json", *ONE)
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"meta", "summary", "baselines", "repos", "timings", "tasks"}
    assert [c["name"] for c in doc["meta"]["configs"]] == ["dense", "moba-hybrid", "moba"]
    assert doc["meta"]["configs"][1]["dense_layers"] == "-3,-2,-1" and doc["meta"]["resamples"] == 2000
    dense, hybrid, moba = doc["summary"]
    assert set(dense["metrics"]) == set(RATES) and dense["n"] == 9 and dense["diff_vs_dense"] == {}
    for m in HEADLINE:
        assert dense["metrics"][m] == {"value": 1.0, "ci": [1.0, 1.0], "n": 9}
    ans = hybrid["metrics"]["answer"]  # the bare name: needles and callers yes (7 of 9), definitions no
    assert ans["value"] == pytest.approx(7 / 9, abs=1e-4) and ans["ci"][0] < 7 / 9 < ans["ci"][1] <= 1.0
    assert hybrid["diff_vs_dense"]["answer"]["value"] == pytest.approx(-2 / 9, abs=1e-4)
    assert hybrid["metrics"]["top1_cite"]["value"] == hybrid["metrics"]["hit_at_3"]["value"] == 0.0
    assert moba["metrics"]["answer"] == {"value": 0.0, "ci": [0.0, 0.0], "n": 9}
    assert moba["diff_vs_dense"]["answer"] == {"value": -1.0, "ci": [-1.0, -1.0], "n": 9}
    assert moba["metrics"]["top1_cite"]["value"] == moba["metrics"]["top3_cite"]["value"] == 1.0
    assert moba["diff_vs_dense"]["top1_cite"] == {"value": 0.0, "ci": [0.0, 0.0], "n": 9}
    assert moba["metrics"]["repoqa_pass"]["n"] == 5  # function needles only
    assert hybrid["targets"]["answer_vs_dense"]["value"] == pytest.approx(7 / 9, abs=1e-4)
    assert moba["targets"]["answer_vs_dense"] == {"value": 0.0, "ci": [0.0, 0.0], "n": 9}
    assert "answer_vs_dense" not in dense["targets"]
    bm25 = doc["baselines"][0]["metrics"]["bm25_hit_at_1"]["value"]
    assert moba["targets"]["hit1_minus_bm25"]["value"] == pytest.approx(moba["metrics"]["hit_at_1"]["value"] - bm25,
                                                                        abs=1e-4)
    assert all(row["bogus"] == 0 for row in doc["summary"])
    assert set(doc["baselines"][0]["metrics"]) == {"bm25_hit_at_1", "bm25_fn_top1", "bm25_fn_top3", "random_hit_at_1"}
    assert [(a, d) for a, d, *_ in oracle.retuned] == [("dense", ()), ("moba", (-3, -2, -1)), ("moba", ())]
    assert all(nc and bs == 64 for *_, bs, nc in oracle.retuned)


def test_one_prefill_per_config_and_every_task_reported(repo, oracle):
    doc = json.loads(run("eval", repo, "--json", *ONE).stdout)
    assert len(oracle.engines) == 3
    for eng in oracle.engines:
        assert eng.prefills[0] > 1000 and len(eng.prefills) == 1 + 9 and max(eng.prefills[1:]) < 300
    assert [t["id"] for t in doc["tasks"]] == [t.id for t in oracle.tasks]
    t = doc["tasks"][0]
    assert {"id", "repo", "context_tokens", "kind", "name", "path", "start_line", "end_line", "depth", "question",
            "bm25_rank", "bm25_fn_top1", "bm25_fn_top3", "random_file", "results"} <= set(t)
    res = t["results"]["dense"]
    assert res["rank"] == 1 and res["bogus"] == 0 and res["citations"][0]["path"] == t["path"]
    assert {x["config"] for x in doc["timings"]} == {"dense", "moba-hybrid", "moba"}


def test_repositories_split_the_tasks_and_sizes_each_get_a_workspace(tmp_path, repo, oracle):
    other = make_repo(tmp_path / "other" / "repo")
    oracle.tasks = build_workspace(str(repo), oracle.tokenizer, context_tokens=20000, n_tasks=5, seed=3).tasks
    r = run("eval", repo, other, "--json", *ARGS, "--tasks", "10", "--context-tokens", "20000,25000")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(u["repo"], u["context_tokens"], u["tasks"]) for u in doc["meta"]["repos"]] == [
        ("repo#1", 20000, 5), ("repo#2", 20000, 5), ("repo#1", 25000, 5), ("repo#2", 25000, 5)]
    assert len(oracle.engines) == 2 * 2 * 3  # one prefill per repository, size and config
    assert [(s["context_tokens"], s["config"], s["n"]) for s in doc["summary"]] == [
        (size, c, 10) for size in (20000, 25000) for c in ("dense", "moba-hybrid", "moba")]
    assert {(x["repo"], x["context_tokens"], x["n"]) for x in doc["repos"]} == {
        (name, size, 5) for name in ("repo#1", "repo#2") for size in (20000, 25000)}
    assert sum(t["repo"] == "repo#2" and t["context_tokens"] == 25000 for t in doc["tasks"]) == 5


def test_max_new_tokens_is_honoured(repo, oracle):
    args = [a if a != "4000" else "5" for a in ONE]
    doc = json.loads(run("eval", repo, "--json", *args).stdout)
    lengths = [row["answer_tokens"] for t in doc["tasks"] for row in t["results"].values()]
    assert max(lengths) == 5 and doc["meta"]["max_new_tokens"] == 5


def test_markdown_tables_with_intervals_progress_and_output_file(repo, oracle, tmp_path):
    before = snapshot(repo)
    out = tmp_path / "run.json"
    r = run("eval", repo, *ONE[:-6], "--tasks", "9", "--context-tokens", "20000", "--attention", "dense,moba",
            "-o", out)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("moba-ask eval: model fake-model, 1 workspace(s), seed 3")
    assert "## 20,000 context tokens, 9 tasks" in r.stdout
    assert any(ln.startswith("| dense | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |") for ln in lines)
    assert any(ln.startswith("| moba | 0.00 [0.00, 0.00] |") for ln in lines)
    assert any(ln.startswith("| moba | -1.00 [-1.00, -1.00] | ") for ln in lines)  # paired difference
    assert "| BM25 file hit@1 | BM25 function top-1 | BM25 function top-3 | random file hit@1 |" in r.stdout
    assert "| config | answers / dense's | hit@1 - BM25 hit@1 |" in r.stdout
    assert any(ln.startswith("| moba | 0.00 [0.00, 0.00] | ") and ln.count("|") == 4 for ln in lines)
    assert sum(ln.startswith("| repo 0") for ln in lines) == 9
    assert "repo at 20,000: 9 tasks (5 function" in r.stderr and "repo @ 20,000, dense: 9 questions in" in r.stderr
    assert "repo @ 20,000, moba: 0/9 questions" in r.stderr
    saved = json.loads(out.read_text())
    assert [c["name"] for c in saved["meta"]["configs"]] == ["dense", "moba"]
    assert saved["meta"]["repos"][0]["files"] == 6  # *.py only
    assert snapshot(repo) == before


@pytest.mark.parametrize("args,code,message", [
    (["--attention", "dense,flash"], 2, "unknown attention config 'flash'"),
    (["--attention", "moba,moba"], 2, "listed twice"),
    (["--attention", "moba:dense=x"], 2, "dense layers must be"),
    (["--attention", "moba:warp=9"], 2, "unknown key 'warp'"),
    (["--context-tokens", "40000"], 2, "use at most 32,192"),
    (["--context-tokens", "16384,abc"], 2, "integers separated by commas"),
    (["--context-tokens", "100"], 2, "at least 256"),
    (["--context-tokens", ",,"], 2, "needs at least one size"),
])
def test_bad_flags_are_one_line_errors(repo, oracle, args, code, message):
    r = run("eval", repo, *args)
    assert r.exit_code == code and message in r.stderr and "Traceback" not in r.stderr


def test_bad_paths_are_one_line_errors(tmp_path, oracle):
    r = run("eval", tmp_path / "missing")
    assert r.exit_code == 1 and "path not found" in r.stderr
    f = write_tree(tmp_path / "t", {"a.py": "x = 1\n"}) / "a.py"
    r = run("eval", f)
    assert r.exit_code == 2 and "REPO must be a directory" in r.stderr
    docs = write_tree(tmp_path / "docs", {"README.md": "# words\n"})
    r = run("eval", docs)
    assert r.exit_code == 1 and "no files to pack" in r.stderr
    r = run("eval", tmp_path / "t")
    assert r.exit_code == 1 and "no Python functions with docstrings" in r.stderr and str(tmp_path / "t") in r.stderr
    r = run("eval")
    assert r.exit_code == 2 and "Missing argument" in r.stderr


def test_output_is_rewritten_after_each_workspace_and_marked_complete_at_the_end(tmp_path, repo, oracle,
                                                                                 monkeypatch):

    other = make_repo(tmp_path / "other" / "repo")
    oracle.tasks = build_workspace(str(repo), oracle.tokenizer, context_tokens=20000, n_tasks=5, seed=3).tasks
    written = []
    real = common.write_json
    monkeypatch.setattr(common, "write_json",
                        lambda path, doc, *a: (written.append(json.loads(json.dumps(doc))), real(path, doc, *a)))
    out = tmp_path / "run.json"
    r = run("eval", repo, other, *ARGS, "--tasks", "10", "--context-tokens", "20000", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert [(d["meta"]["complete"], len(d["tasks"])) for d in written] == [(False, 5), (False, 10), (True, 10)]
    assert {t["repo"] for t in written[0]["tasks"]} == {"repo#1"} and written[0]["summary"][0]["n"] == 5
    assert json.loads(out.read_text()) == written[-1] and not (tmp_path / "run.json.tmp").exists()


def test_an_output_file_in_a_missing_directory_is_refused_before_the_model_loads(tmp_path, repo, oracle):
    r = run("eval", repo, "-o", tmp_path / "nope" / "run.json")
    assert r.exit_code == 1 and "does not exist; create it first" in r.stderr and not oracle.engines


def test_what_one_repository_lacks_is_asked_of_the_others(tmp_path, repo, oracle):
    small = make_repo(tmp_path / "small", modules=1)  # 5 needles, 1 class, 1 constant, no caller: 7 tasks
    oracle.tasks = [*build_workspace(str(repo), oracle.tokenizer, context_tokens=20000, n_tasks=11, seed=3).tasks,
                    *build_workspace(str(small), oracle.tokenizer, context_tokens=20000, n_tasks=9, seed=3).tasks]
    r = run("eval", small, repo, "--json", *ARGS, "--tasks", "18", "--context-tokens", "20000", "--attention", "dense")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [(u["repo"], u["tasks"]) for u in doc["meta"]["repos"]] == [("small", 7), ("repo", 11)]
    assert doc["summary"][0]["n"] == 18 and "note:" not in r.stderr
    r = run("eval", small, "--json", *ARGS, "--tasks", "9", "--context-tokens", "20000", "--attention", "dense")
    assert r.exit_code == 0 and "note: 7 of --tasks 9 at 20,000 tokens" in r.stderr
