"""Seed statistics of a run: the mean and spread of a metric over seeds, and the paired difference of two
students with its 95% t-interval.

Paired by seed: students trained with the same seed read the same batches in the same order
(`pipelines.data.batches`) from the same initial RNG state, so the difference per seed removes the part of the
noise the two share, and its t-interval (n - 1 degrees of freedom) is the honest one for so few seeds.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

CONFIDENCE = 0.95


def mean_and_spread(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, sample standard deviation); the spread is None with fewer than two values."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student t critical value: 12.706 for 1 degree of freedom at 95%."""
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, df))


def paired_difference(values: dict[Any, float], baseline: dict[Any, float]) -> dict[str, Any] | None:
    """`values - baseline` over the seeds both have: mean, sd, n, the seeds and the 95% t-interval.

    With one common seed there is a difference but no interval (`ci95` None); with none, None."""
    seeds = [
        seed
        for seed in values
        if seed in baseline and values[seed] is not None and baseline[seed] is not None
    ]
    if not seeds:
        return None
    differences = [values[seed] - baseline[seed] for seed in seeds]
    mean, sd = mean_and_spread(differences)
    interval = None
    if sd is not None:
        half = t_quantile(len(seeds) - 1) * sd / math.sqrt(len(seeds))
        interval = [mean - half, mean + half]
    return {
        "mean": mean,
        "sd": sd,
        "n": len(seeds),
        "seeds": seeds,
        "ci95": interval,
        "per_seed": differences,
    }


def verdict(difference: dict[str, Any] | None, lower_is_better: bool = True) -> str:
    """In words: `lower`, `higher` (the interval excludes 0), `not decided`, or why there is no interval."""
    if difference is None:
        return "no common seed"
    if difference["ci95"] is None:
        return "one seed: no interval"
    low, high = difference["ci95"]
    if low > 0 or high < 0:
        better = (high < 0) == lower_is_better
        return "better" if better else "worse"
    return "not decided (the interval holds 0)"
