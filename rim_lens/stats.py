"""Estimates with 95% intervals: every accuracy, rate and score rim-lens reports carries one.

`Estimate` is a point value with its interval. Claims compare interval bounds, never points:
`a.above(b)` holds only when a's lower bound exceeds b's upper bound.
"""

from __future__ import annotations

import math
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
    (e.g. all rows of one question) are resampled together. `vectorized` (without groups):
    `statistic` takes all resamples at once, [n_boot, n] -> [n_boot] (same draws, much faster)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return Estimate(math.nan, math.nan, math.nan, 0, "bootstrap")
    rng = np.random.default_rng(seed)
    if groups is None:
        draws = rng.integers(values.size, size=(n_boot, values.size))
        if vectorized:
            stats = np.asarray(statistic(values[draws]), dtype=float)
            point = float(statistic(values[None])[0])
            lo, hi = np.nanpercentile(stats, [2.5, 97.5])
            return Estimate(point, float(lo), float(hi), int(values.size), "bootstrap")
        stats = np.array([statistic(values[d]) for d in draws])
    else:
        ids = np.unique(np.asarray(groups), return_inverse=True)[1]
        members = [np.flatnonzero(ids == g) for g in range(ids.max() + 1)]
        stats = np.array(
            [
                statistic(
                    values[
                        np.concatenate([members[g] for g in rng.integers(len(members), size=len(members))])
                    ]
                )
                for _ in range(n_boot)
            ]
        )
    lo, hi = np.nanpercentile(stats, [2.5, 97.5])
    return Estimate(float(statistic(values)), float(lo), float(hi), int(values.size), "bootstrap")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value), e.g. over seeds."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0
