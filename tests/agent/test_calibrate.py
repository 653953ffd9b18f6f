"""Calibration on toy evidence: the head that points at the gold block is found and weighted, the
weights round-trip through the JSON format, and the calibrate command rejects bad input in one line."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from agent import headweights
from agent.cli import cli
from agent.config import AskConfig
from agent.evaluate import calibrate as cal
from tests.agent.test_cli_errors import model_dir  # noqa: F401  (a fixture)

L, H, NB = 3, 4, 10
RETRIEVER = (2, 1)


def toy_samples(n=12, seed=0):
    """n tasks; head (2, 1) puts most of its mass on the gold block, the others on random blocks,
    and head (0, 0) on block 1 (not citable: a sink). The gate signal is noise everywhere."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        gold = int(rng.integers(2, NB))
        mass = torch.from_numpy(rng.random((L, H, NB))).float()
        mass[RETRIEVER][gold] += 3.0
        mass[0, 0, 1] += 50.0
        cand = np.arange(NB) >= 2
        g = np.zeros(NB, bool)
        g[gold] = True
        ev = {"mass": mass, "gate": torch.from_numpy(rng.random((L, H, NB - 1))).float()}
        out.append(cal.Sample(f"t{i}", ev, cand, g, g))
    return out


def test_per_head_scores_find_the_retrieval_head():
    mrr, hit1 = cal.head_scores(toy_samples(), "mass")
    assert mrr.shape == (L, H) and divmod(int(mrr.argmax()), H) == RETRIEVER
    assert mrr[RETRIEVER] == 1.0 and hit1[RETRIEVER] == 1.0 and hit1.flatten().sort().values[-2] < 0.5


def test_calibration_picks_that_head_and_beats_uniform():
    samples = toy_samples()
    identity = dict(name="toy", num_layers=L, num_heads=H, num_kv_heads=2, hidden_size=32)
    hw = cal.calibrate(samples, model="toy", identity=identity, cfg=AskConfig(block_size=64),
                       repos=["a", "b"], top_heads=(1, 2, 4))
    assert hw.signal == "mass" and max(hw.weights, key=lambda r: r[2])[:2] == RETRIEVER
    assert len(hw.weights) == hw.meta["top_heads"] and abs(sum(r[2] for r in hw.weights) - 1) < 1e-6
    m = hw.meta["metrics"]
    assert m["chosen"]["block_hit_at_1"] == 1.0 > m["uniform"]["block_hit_at_1"]
    assert m["cross_fold"]["block_hit_at_1"] == 1.0
    assert hw.meta["calibration"] == {"repos": ["a", "b"], "tasks": 12} and hw.block_size == 64
    back = headweights.parse(json.loads(json.dumps(hw.to_json())))
    assert back.weights == tuple((a, b, round(w, 6)) for a, b, w in hw.weights) and back.meta["identity"] == identity
    headweights.check(back, layers=L, heads=H, block_size=64, source="toy")


def test_ties_count_against_a_head():
    s = toy_samples(1)[0]
    flat = torch.zeros(1, 1, NB, dtype=torch.float64)
    assert float(cal._gold_rank(flat, s)) == NB - 2  # all 8 candidates tie: the gold ranks last


def test_no_usable_task_is_a_clear_error():
    with pytest.raises(ValueError, match="no task has its gold lines in a citable block"):
        cal.calibrate([], model="toy", identity={}, cfg=AskConfig(), repos=["a"])


@pytest.mark.parametrize("args,needle", [
    (["/no/such/repo", "-o", "w.json"], "path not found: /no/such/repo"),
    (["{tmp}", "-o", "/no/such/dir/w.json"], "the directory of --output does not exist"),
    (["{tmp}", "-o", "w.json", "--top-heads", "4,zero"], "--top-heads must be positive integers"),
    (["{tmp}", "-o", "w.json", "--top-heads", "0"], "--top-heads must be positive integers"),
    (["{tmp}", "-o", "w.json", "--dense-layers", "x"], "dense layers must be comma-separated integers"),
    (["{tmp}"], "Missing option '-o' / '--output'"),
], ids=["missing-repo", "output-dir", "top-heads-word", "top-heads-zero", "dense-layers", "no-output"])
def test_bad_input_is_one_line_before_any_model_loads(tmp_path, monkeypatch, args, needle):
    def no_model(cfg):
        raise AssertionError("loaded a model")

    monkeypatch.setattr("agent.runtime.load_runtime", no_model)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["calibrate", *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    assert res.exit_code == 2 or res.exit_code == 1
    assert needle in res.output and "Traceback" not in res.output


def test_calibrate_on_a_real_tiny_model_keeps_every_heads_line_mass(model_dir, tmp_path, monkeypatch):  # noqa: F811
    """Through the command on a 2-layer Llama (random weights): every sample carries its citable lines with
    each of the 2 x 4 heads' question mass, the line choice runs on every sample ranked by the chosen block
    weights (and on two folds), and the written file parses (a lines section, when one won, is valid for the
    model and names its selection)."""
    from tests.agent.test_eval_tasks import make_repo

    monkeypatch.setenv("MOBA_ASK_CACHE_DIR", str(tmp_path / "cache"))
    repo = make_repo(tmp_path / "repo", modules=4)
    from agent.evaluate import linecal

    seen, chosen = [], []
    real_collect, real_choose = cal.collect, linecal.choose

    def collect(*a, **k):
        got = real_collect(*a, **k)
        seen.extend(got)
        return got

    monkeypatch.setattr(cal, "collect", collect)
    monkeypatch.setattr(linecal, "choose", lambda cases, *a, **k: chosen.append(cases) or real_choose(cases, *a, **k))
    out = tmp_path / "w.json"
    res = CliRunner().invoke(cli, ["calibrate", str(repo), "-m", str(model_dir), "--context-tokens", "3200",
                                   "--tasks", "4", "--block-size", "64", "--top-k", "2", "--device", "cpu",
                                   "--dtype", "float32", "-o", str(out), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert seen and all(s.line is not None and s.line.mass.shape[1] == 2 * 4 for s in seen)
    for s in seen:
        cand_blocks = set(np.flatnonzero(s.cand).tolist())
        assert set(s.line.block.tolist()) <= cand_blocks and s.line.mass.astype(np.float32).sum() > 0
    (cases, *folds) = chosen  # the whole set, then the two-fold check's halves
    assert len(cases) == len(seen) and len(folds) == 2
    assert all(len(set(c.block.tolist())) <= linecal.KEEP and c.scores.any() for c in cases)
    hw = headweights.read(out)
    if hw.lines is not None:  # random weights: a lines section is written only when its heads won
        assert set(hw.selection()) == {"top_n", "max_lines", "keep_share"} and hw.line_matrix().shape == (2, 4)
        assert hw.lines.meta["metrics"]["tasks"] == len(seen)
