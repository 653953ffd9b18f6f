"""bench/cite_rescore.py on saved evidence: the run's own settings give back the stored citations, and a
grid setting changes what is cited."""

from types import SimpleNamespace

import numpy as np
import pytest

from agent import citations as cit
from agent.evaluate import evidence
from bench import cite_rescore
from tests.agent.test_citations import BS, _w, evidence_recorder, pk  # noqa: F401  (pk is a fixture)
from tests.agent.test_evidence import _session


def test_default_reproduces_the_stored_citations_and_a_setting_narrows_them(pk, tmp_path):  # noqa: F811
    smap = pk.source_map
    gold, noise = smap.line_tokens("pkg/util.py", 20)[0] // BS, smap.line_tokens("pkg/core.py", 40)[0] // BS
    rec = evidence_recorder(smap, gold, noise)
    stored = cit.combine(cit.from_routing(rec, smap, block_size=BS, sink_blocks=1, weights=_w()), [])  # as a session
    log = evidence.EvidenceLog()
    log.keep("r", 4096, "moba", "01-def", _session(smap), SimpleNamespace(recorder=rec))
    log.save(str(tmp_path / "ev.npz"))
    units = evidence.load(str(tmp_path / "ev.npz"))
    first = stored[0]
    task = dict(kind="class", path=first.path, start_line=first.start_line, end_line=first.start_line,
                results={"moba": dict(answer="no reference", citations=[c.to_dict() for c in stored])})
    tasks = {("r", 4096, "01-def"): task}
    assert units[0].cite == cite_rescore.DEFAULT and cite_rescore.check(units, tasks) == 1.0
    (default,) = cite_rescore.rows_for(units, tasks, evidence.BEFORE_KEEP_SHARE)
    (narrow,) = cite_rescore.rows_for(units, tasks, dict(cite_rescore.DEFAULT, max_lines=1, top_n=1))
    assert narrow["top1_cite"] and default["top1_cite"] and len(narrow["citations"]) == 1 < len(default["citations"])
    assert narrow["line_precision"] == default["line_precision"] == 1.0


def test_grid_is_every_combination_and_unknown_keys_stop():
    grid = cite_rescore.parse_grid("top_n=3,8 keep_share=0,0.5")
    assert len(grid) == 4 and {(g["top_n"], g["keep_share"]) for g in grid} == {(3, 0), (3, 0.5), (8, 0), (8, 0.5)}
    assert all(g["max_lines"] == 24 for g in grid)
    with pytest.raises(SystemExit, match="unknown grid key"):
        cite_rescore.parse_grid("warp=1")


def test_line_mass_splits_the_question_from_the_answer():
    u = SimpleNamespace(mass={"t": np.array([1.0, 2.0, 3.0, 4.0])}, answer_mass={"t": np.array([0.5, 2.0])})
    np.testing.assert_array_equal(cite_rescore.line_mass(u, "t", "all"), [1, 2, 3, 4])
    np.testing.assert_array_equal(cite_rescore.line_mass(u, "t", "answer"), [0.5, 2, 0, 0])
    np.testing.assert_array_equal(cite_rescore.line_mass(u, "t", "question"), [0.5, 0, 3, 4])
    with pytest.raises(SystemExit, match="no answer mass"):
        cite_rescore.line_mass(SimpleNamespace(mass=u.mass, answer_mass={}), "t", "answer")
