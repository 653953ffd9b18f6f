"""The evaluation's saved routing evidence: what `EvidenceLog` keeps re-scores to the very citations the
session gave (bench/cite_rescore.py relies on it), dense answers keep nothing, and `eval --evidence`
writes it through the CLI."""

from types import SimpleNamespace

import numpy as np
import pytest

from agent import citations as cit
from agent.config import AskConfig
from agent.evaluate import evidence
from moba.hf import MobaParams
from tests.agent.test_citations import BS, _w, evidence_recorder, pk  # noqa: F401  (pk is a fixture)
from tests.agent.test_eval_cli import ONE, oracle, repo, run  # noqa: F401  (fixtures)


def _session(smap, attention="moba", lines=None):
    hw = SimpleNamespace(matrix=_w, signal=cit.MASS, lines=lines)
    return SimpleNamespace(config=AskConfig(attention=attention), params=MobaParams(block_size=BS, sink_blocks=1),
                           smap=smap, head_weights=hw, cite_selection=evidence.cite_settings)


def test_saved_evidence_gives_back_the_sessions_citations(pk, tmp_path):  # noqa: F811
    smap = pk.source_map
    gold, noise = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    rec = evidence_recorder(smap, gold, noise, sink=smap.line_tokens("README.md", 3)[0] // BS)
    live = cit.from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w())
    rec.tail_mass = rec.key_mass[: len(rec.key_mass) // 2] / 3
    log = evidence.EvidenceLog()
    log.keep("r", 4096, "moba", "01-fn", _session(smap), SimpleNamespace(recorder=rec))
    log.keep("r", 4096, "dense", "01-fn", _session(smap, "dense"), SimpleNamespace(recorder=rec))
    path = tmp_path / "ev.npz"
    log.save(str(path))
    (u,) = evidence.load(str(path))
    assert (u.repo, u.context_tokens, u.config, u.block_size, u.sink_blocks) == ("r", 4096, "moba", BS, 1)
    assert u.mass_heads == "blocks"
    assert u.smap.paths == smap.paths and np.array_equal(u.smap.starts, smap.starts)
    assert list(u.scores) == ["01-fn"] and u.mass["01-fn"].dtype == np.float32
    n = len(u.mass["01-fn"])
    kept = evidence._kept_tokens(u.scores["01-fn"], BS)
    kept = kept[kept < n]
    tail, saved_tail = np.zeros(n, np.float32), np.zeros(n, np.float32)
    tail[: len(rec.tail_mass)] = rec.tail_mass.numpy()
    saved_tail[: len(u.answer_mass["01-fn"])] = u.answer_mass["01-fn"]
    np.testing.assert_allclose(saved_tail[kept], tail[kept], rtol=1e-3)
    np.testing.assert_allclose(u.mass["01-fn"][kept], rec.key_mass.numpy()[kept], rtol=1e-3)
    dropped = np.setdiff1d(np.arange(n), kept)  # outside the best blocks nothing is kept
    assert len(dropped) and not u.mass["01-fn"][dropped].any() and not saved_tail[dropped].any()
    again = cit.cite_blocks(u.scores["01-fn"], u.mass["01-fn"], u.smap, block_size=u.block_size)
    assert live and [(c.path, c.start_line, c.end_line) for c in again] == [
        (c.path, c.start_line, c.end_line) for c in live]
    assert [c.score for c in again] == pytest.approx([c.score for c in live], rel=1e-3)


def test_eval_writes_evidence_for_moba_configs_only(repo, oracle, tmp_path):  # noqa: F811
    out = tmp_path / "ev.npz"
    args = [a if a != "dense,moba-hybrid,moba" else "dense,moba" for a in ONE]
    r = run("eval", repo, "--json", *args, "--evidence", out)
    assert r.exit_code == 0, r.stderr
    units = evidence.load(str(out))
    assert [(u.config, u.context_tokens, len(u.scores)) for u in units] == [("moba", 20000, 9)]
    assert set(units[0].answer_mass) == set(units[0].scores)
    assert not list(tmp_path.glob("*.npz.tmp*")) and len(list(tmp_path.glob("*.npz"))) == 1


def test_evidence_must_be_an_npz_path(repo, oracle, tmp_path):  # noqa: F811
    r = run("eval", repo, *ONE, "--evidence", tmp_path / "ev.txt")
    assert r.exit_code == 2 and "--evidence must name a .npz file" in r.stderr and "Traceback" not in r.stderr


def test_evidence_says_when_line_heads_weigh_the_mass(pk, tmp_path):  # noqa: F811
    smap = pk.source_map
    gold, noise = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    rec = evidence_recorder(smap, gold, noise, sink=smap.line_tokens("README.md", 3)[0] // BS)
    log = evidence.EvidenceLog()
    log.keep("r", 4096, "moba", "01-fn", _session(smap, lines=object()), SimpleNamespace(recorder=rec))
    log.save(str(tmp_path / "ev.npz"))
    (u,) = evidence.load(str(tmp_path / "ev.npz"))
    assert u.mass_heads == "lines"
