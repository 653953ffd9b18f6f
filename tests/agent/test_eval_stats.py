"""Bootstrap intervals and paired differences on cases with known answers."""

import pytest

from agent.evaluate import stats
from agent.evaluate.stats import Estimate, bootstrap, paired


def test_constant_values_give_a_point_interval():
    assert bootstrap([1, 1, 1, 1], seed=0) == Estimate(1.0, 1.0, 1.0, 4)
    assert bootstrap([0.0] * 7, seed=5) == Estimate(0.0, 0.0, 0.0, 7)


def test_same_seed_same_interval_other_seed_other_interval():
    x = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0]
    assert bootstrap(x, seed=3) == bootstrap(x, seed=3)
    assert bootstrap(x, seed=3) != bootstrap(x, seed=4)


def test_interval_brackets_the_mean_and_shrinks_with_more_tasks():
    small = bootstrap([1, 0] * 10, seed=0)
    large = bootstrap([1, 0] * 500, seed=0)
    assert small.value == large.value == 0.5
    assert small.lo < 0.5 < small.hi and large.lo < 0.5 < large.hi
    assert large.hi - large.lo < (small.hi - small.lo) / 3
    assert small.hi - small.lo == pytest.approx(2 * 1.96 * (0.25 / 20) ** 0.5, abs=0.08)  # ~normal width


def test_none_values_are_left_out_and_none_at_all_is_empty():
    assert bootstrap([1, None, 1], seed=0) == Estimate(1.0, 1.0, 1.0, 2)
    assert bootstrap([None, None], seed=0) == Estimate(None, None, None, 0)
    assert Estimate(None, None, None, 0).cell() == "n/a"


def test_paired_difference_of_identical_configs_is_zero_and_a_constant_shift_is_exact():
    a = [1, 0, 1, 1, 0, 0, 1]
    assert paired(a, a, seed=1) == Estimate(0.0, 0.0, 0.0, 7)
    assert paired([x + 0.25 for x in a], a, seed=1) == Estimate(0.25, 0.25, 0.25, 7)


def test_paired_keeps_tasks_where_both_exist_and_needs_equal_lengths():
    assert paired([1, None, 0], [0, 1, None], seed=0) == Estimate(1.0, 1.0, 1.0, 1)
    with pytest.raises(ValueError):
        paired([1, 0], [1], seed=0)


def test_cells_and_dict():
    e = Estimate(0.7142, 0.64, 0.78, 21)
    assert e.cell() == "0.71 [0.64, 0.78]" and Estimate(-0.05, -0.11, 0.01, 3).cell(signed=True) == "-0.05 [-0.11, +0.01]"
    assert e.to_dict() == {"value": 0.7142, "ci": [0.64, 0.78], "n": 21}


def test_paired_ratio_is_the_ratio_of_totals_with_an_interval_around_it():
    one = stats.paired_ratio([1, 1, 0, 1], [1, 1, 1, 1], seed=0)
    assert one.value == 0.75 and one.n == 4 and one.lo < 0.75 <= one.hi <= 1.0
    more = stats.paired_ratio([1, 1, 0, 1] * 50, [1, 1, 1, 1] * 50, seed=0)
    assert more.value == 0.75 and one.hi - one.lo > more.hi - more.lo > 0
    assert stats.paired_ratio([1, 1], [1, 1], seed=0).to_dict() == {"value": 1.0, "ci": [1.0, 1.0], "n": 2}
    assert stats.paired_ratio([2, None, 1], [1, 1, 1], seed=0).value == 1.5  # pairs where both exist
    assert stats.paired_ratio([1, 1], [0, 0], seed=0).value is None  # dense never scores: no ratio
