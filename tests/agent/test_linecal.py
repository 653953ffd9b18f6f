"""Line-weight calibration: a head whose question mass peaks on the gold line scores, the choice takes it
with a narrow line selection when that beats the block weights' lines, and gives nothing when no head helps."""

import numpy as np
import torch

from agent.evaluate import linecal
from tests.agent.test_citations import BS, pk  # noqa: F401  (pk is a fixture)

ROWS = 3  # one layer of three heads: 0 marks the gold line, 1 marks another line, 2 sees nothing


class HeadKeys:
    """A recorder double: per-head question mass [1, ROWS, Tk]."""

    def __init__(self, mass):
        self.mass = mass

    def head_key_mass(self, n_layers):
        return self.mass


def _case(smap, path, gold_line, other_line, marks=(0, 1)):
    gold_block = smap.line_tokens(path, gold_line)[0] // BS
    mass = torch.full((1, ROWS, smap.total), 0.01)
    mass[0, 2] = 0.0
    for head, line in zip(marks, (gold_line, other_line)):
        mass[0, head, slice(*smap.line_tokens(path, line))] += 5.0
    scores = np.zeros(smap.total // BS + 1)
    scores[gold_block] = 1.0
    return linecal.case_from(HeadKeys(mass), smap, blocks=[gold_block], block_size=BS, n_layers=1, answer="",
                             path=path, start_line=gold_line, end_line=gold_line, scores=scores)


def _cases(smap):
    return [_case(smap, "pkg/util.py", ln, ln + 1) for ln in (10, 20, 30)]


def test_case_lines_and_per_head_mass(pk):  # noqa: F811
    case = _case(pk.source_map, "pkg/util.py", 20, 21)
    assert case.mass.shape == (len(case.line), ROWS) and case.gold().sum() == 1
    assert case.line[case.mass[:, 0].argmax()] == 20 and case.line[case.mass[:, 1].argmax()] == 21
    assert not case.mass[:, 2].any()
    assert set(case.block) == {pk.source_map.line_tokens("pkg/util.py", 20)[0] // BS}


def test_the_head_on_the_gold_line_scores_and_is_chosen(pk):  # noqa: F811
    cases = _cases(pk.source_map)
    hits = linecal.head_hits(cases)
    assert hits.tolist() == [1.0, 0.0, 0.0]
    w, sel, metrics = linecal.choose(cases, block_weights=np.array([0.0, 1.0, 0.0]))
    assert w is not None and w[0] > 0.99 and sel["max_lines"] == 1
    assert metrics["chosen"]["line_precision"] == 1.0 > metrics["default"]["line_precision"]
    lw = linecal.line_weights(w, sel, metrics, heads=ROWS)
    assert lw.weights[0][:2] == (0, 0) and lw.selection() == sel


def test_nothing_is_chosen_when_no_head_beats_the_block_weights(pk):  # noqa: F811
    cases = [linecal.LineCase(c.scores, c.block, c.file, c.line, c.tok, np.zeros_like(c.mass), c.smap, BS, "",
                              c.path, c.start_line, c.end_line) for c in _cases(pk.source_map)]
    w, sel, metrics = linecal.choose(cases, block_weights=np.array([1.0, 0.0, 0.0]))
    assert w is None and sel is None and metrics["chosen"] == metrics["default"]


def test_narrowed_keeps_the_best_blocks_lines(pk):  # noqa: F811
    smap = pk.source_map
    a, b = (smap.line_tokens("pkg/util.py", ln)[0] // BS for ln in (10, 40))
    mass = torch.rand(1, ROWS, smap.total)
    case = linecal.case_from(HeadKeys(mass), smap, blocks=[a, b], block_size=BS, n_layers=1, answer="",
                             path="pkg/util.py", start_line=10, end_line=10)
    scores = np.zeros(smap.total // BS + 1)
    scores[b] = 1.0
    only = case.narrowed(scores)
    assert set(only.block) == {b} and len(only.line) < len(case.line) and only.scores is scores
