"""Estimates with 95% intervals: every accuracy, rate and score rim-lens reports carries one.

`Estimate` is a point value with its interval. Claims compare interval bounds, never points:
`a.above(b)` holds only when a's lower bound exceeds b's upper bound.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal quantile of a two-sided 95% interval


@dataclass(frozen=True)
class Estimate:
    """A value with its 95% interval [lo, hi], from n observations, and how it was made."""

    value: float
    lo: float
    hi: float
    n: int
    method: str = ""

    def above(self, other: Estimate | float) -> bool:
        """Whether this is larger than `other` beyond both intervals."""
        return self.lo > (other.hi if isinstance(other, Estimate) else other)

    def below(self, other: Estimate | float) -> bool:
        """Whether this is smaller than `other` beyond both intervals."""
        return self.hi < (other.lo if isinstance(other, Estimate) else other)

    def overlaps(self, other: Estimate) -> bool:
        return not (self.above(other) or self.below(other))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Estimate:
        return cls(**d)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.lo:.3f}, {self.hi:.3f}]"


def wilson(successes: int, n: int, z: float = Z95) -> Estimate:
    """The proportion successes / n with its Wilson score interval (good for small n and p near 0 or 1)."""
    if n <= 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "wilson")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n successes the bound is exactly 0 or 1; the formula leaves rounding residue (~1e-17),
    # which would read as "above 0".
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return Estimate(p, lo, hi, n, "wilson")


def proportion(flags: Sequence[bool] | np.ndarray) -> Estimate:
    """The fraction of true flags (e.g. correct answers), with its Wilson interval."""
    flags = np.asarray(flags, dtype=bool)
    return wilson(int(flags.sum()), int(flags.size))


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    groups: Sequence | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    vectorized: bool = False,
) -> Estimate:
    """`statistic` of `values` with a percentile bootstrap interval; with `groups`, whole groups
    (e.g. all rows of one question) are resampled together (`grouped_bootstrap`). `vectorized`
    (without groups): `statistic` takes all resamples at once, [n_boot, n] -> [n_boot] (same
    draws, much faster)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap")
    if groups is not None:

        def resampled(weights: np.ndarray) -> np.ndarray:  # [B, n] draws per row -> [B] statistics
            return np.array([statistic(np.repeat(values, w.astype(int))) for w in weights])

        lo, hi = grouped_bootstrap(resampled, np.asarray(groups), n_boot, seed)
        return Estimate(float(statistic(values)), float(lo), float(hi), int(values.size), "bootstrap")
    draws = np.random.default_rng(seed).integers(values.size, size=(n_boot, values.size))
    if vectorized:
        stats = np.asarray(statistic(values[draws]), dtype=float)
        point = float(statistic(values[None])[0])
    else:
        stats = np.array([statistic(values[d]) for d in draws])
        point = float(statistic(values))
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return Estimate(point, float(lo), float(hi), int(values.size), "bootstrap")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), e.g. over seeds."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def grouped_bootstrap(
    stat: Callable[[np.ndarray], np.ndarray],
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 100,
) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile interval of a statistic when question groups are resampled with replacement.

    `stat` maps row weights [B, n] (how often each row was drawn in each of B replicates) to
    values [B, ...]; the interval (lo, hi) has the trailing shape.
    """
    groups = np.unique(groups, return_inverse=True)[1]
    G = groups.max() + 1
    counts = np.random.default_rng(seed).multinomial(G, np.full(G, 1 / G), size=n_boot)
    stats = np.concatenate(
        [stat(counts[i : i + chunk][:, groups].astype(float)) for i in range(0, n_boot, chunk)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: the interval is NaN
        lo, hi = np.nanpercentile(stats, [2.5, 97.5], axis=0)
    return lo, hi
