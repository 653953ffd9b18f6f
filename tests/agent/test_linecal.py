"""Line-weight calibration: a head whose question mass peaks on the gold line scores, the choice takes it
with a narrow line selection when that beats the block weights' lines, and gives nothing when no head helps."""

import numpy as np
import pytest
import torch

from agent.evaluate import linecal
from tests.agent.test_citations import BS, pk  # noqa: F401  (pk is a fixture)

ROWS = 3  # one layer of three heads: 0 marks the gold line, 1 marks another line, 2 sees nothing


class HeadKeys:
    """A recorder double: per-head question mass [1, ROWS, Tk]."""

    def __init__(self, mass):
        self.mass = mass

    def question_head_mass(self, n_layers):
        return self.mass


def _case(smap, path, gold_line, other_line, marks=(0, 1), floor=0.01):
    gold_block = smap.line_tokens(path, gold_line)[0] // BS
    mass = torch.full((1, ROWS, smap.total), floor)
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


def test_nothing_is_chosen_when_the_block_weights_already_cite_the_gold_line_alone(pk):  # noqa: F811
    """With no floor of mass the gold line is the only one standing out: the default selection already cites it
    alone, so no line heads are kept."""
    cases = [_case(pk.source_map, "pkg/util.py", ln, ln + 1, floor=0.0) for ln in (10, 20, 30)]
    w, sel, metrics = linecal.choose(cases, block_weights=np.array([1.0, 0.0, 0.0]))
    assert w is None and sel is None and metrics["default"]["line_precision"] == 1.0


def test_a_head_with_no_mass_in_a_block_does_not_score_on_its_first_line(pk):  # noqa: F811
    """argmax of an all-zero column is the block's first line: when that line is gold the head must still miss."""
    smap = pk.source_map
    first = next(ln for ln in range(1, 44) if smap.line_tokens("pkg/util.py", ln)[0] // BS
                 == smap.line_tokens("pkg/util.py", 20)[0] // BS)
    hits = linecal.head_hits([_case(smap, "pkg/util.py", first, first + 1)])
    assert hits.tolist() == [1.0, 0.0, 0.0]


def test_two_folds_measure_the_choice_on_the_other_half(pk):  # noqa: F811
    cases = _cases(pk.source_map) + [_case(pk.source_map, "pkg/util.py", ln, ln + 1) for ln in (5, 15, 25)]
    both = linecal.cross_check(cases, block_weights=np.array([0.0, 1.0, 0.0]))
    assert both == {"line_precision": 1.0, "top1_cite": 1.0, "top3_cite": 1.0}
    assert linecal.cross_check(cases[:1], block_weights=np.array([0.0, 1.0, 0.0])) is None


def test_a_recorder_without_per_head_keys_is_a_clear_error(pk):  # noqa: F811
    with pytest.raises(ValueError, match="head_keys=True"):
        linecal.case_from(HeadKeys(torch.zeros(0, 0, 0)), pk.source_map, blocks=[1], block_size=BS, n_layers=1,
                          answer="", path="pkg/util.py", start_line=1, end_line=1)
