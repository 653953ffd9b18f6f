"""Bootstrap intervals for the evaluation's rates: a mean over tasks with its 95% percentile interval,
the paired difference of two configs on the same tasks, and the paired ratio of their totals.

Resampling is over tasks (with replacement), RESAMPLES times, from numpy's generator seeded by the
caller; the interval is the 2.5th and 97.5th percentile of the resampled means. Values that are None
(a metric that does not apply to a task) are left out first; a paired difference keeps the tasks
where both values exist. Knows nothing of models, tasks or reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over n tasks and its bootstrap interval [lo, hi]; all None when n == 0."""

    value: float | None
    lo: float | None
    hi: float | None
    n: int

    def to_dict(self) -> dict:
        return {"value": _round(self.value), "ci": [_round(self.lo), _round(self.hi)], "n": self.n}

    def cell(self, signed: bool = False) -> str:
        """"0.71 [0.64, 0.78]" (signed: "+0.05 [-0.01, +0.11]"), or "n/a"."""
        if self.value is None:
            return "n/a"
        f = "{:+.2f}" if signed else "{:.2f}"
        return f"{f.format(self.value)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def bootstrap(values, seed: int, resamples: int = RESAMPLES) -> Estimate:
    """Mean of the values that are not None with its percentile interval.

    >>> bootstrap([1, 1, 1], seed=0).to_dict()
    {'value': 1.0, 'ci': [1.0, 1.0], 'n': 3}
    """
    x = np.array([float(v) for v in values if v is not None])
    if x.size == 0:
        return Estimate(None, None, None, 0)
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    return Estimate(float(x.mean()), *_interval(x[idx].mean(axis=1)), int(x.size))


def _interval(resampled: np.ndarray) -> tuple[float, float]:
    """The LEVEL percentile interval of resampled statistics."""
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(resampled, [tail, 100 - tail])
    return float(lo), float(hi)


def paired(values, reference, seed: int, resamples: int = RESAMPLES) -> Estimate:
    """Mean of values[i] - reference[i] over the tasks where both exist, with its interval."""
    diffs = [float(a) - float(b) for a, b in zip(values, reference, strict=True) if a is not None and b is not None]
    return bootstrap(diffs, seed, resamples)


def paired_ratio(values, reference, seed: int, resamples: int = RESAMPLES) -> Estimate:
    """sum(values) / sum(reference) over the tasks where both exist ("answers as many tasks as dense"), with
    the interval of that ratio over resampled tasks (resamples whose reference sums to 0 are left out); all
    None when the reference never scores.

    >>> paired_ratio([1, 0, 1, 1], [1, 1, 1, 1], seed=0).value
    0.75
    """
    pairs = np.array([(float(a), float(b)) for a, b in zip(values, reference, strict=True)
                      if a is not None and b is not None]).reshape(-1, 2)
    if pairs[:, 1].sum() == 0:
        return Estimate(None, None, None, len(pairs))
    idx = np.random.default_rng(seed).integers(0, len(pairs), size=(resamples, len(pairs)))
    num, den = pairs[idx, 0].sum(axis=1), pairs[idx, 1].sum(axis=1)
    ratio = float(pairs[:, 0].sum() / pairs[:, 1].sum())
    return Estimate(ratio, *_interval(num[den > 0] / den[den > 0]), len(pairs))
