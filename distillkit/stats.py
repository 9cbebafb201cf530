"""Means and 95% confidence intervals over seeds, without scipy.

The interval is Student's t: ``mean ± t_{0.975, n-1} · s / sqrt(n)`` with ``s`` the sample
standard deviation (n-1 in the denominator). A paired difference is the same interval over
the per-seed differences ``a_i - b_i``. One value gives the mean and no interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# t_{0.975, df} for df = 1..30 (two-sided 95%), from the standard tables.
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
        2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
        2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975  # Cornish-Fisher expansion; within 1e-3 of the exact value for df > 30
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float | None  # None with a single value
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def text(self, digits: int = 3) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"

    def to_json(self) -> dict:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "half_width": self.half_width,
                "n": self.n}


def mean_ci(values: Sequence[float]) -> Estimate:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return Estimate(mean, t975(n - 1) * math.sqrt(var) / math.sqrt(n), n)


def paired_diff(a: Sequence[float], b: Sequence[float]) -> Estimate:
    """Mean and CI of ``a_i - b_i`` (the pairs must be in the same order, e.g. by seed)."""
    if len(a) != len(b):
        raise ValueError("paired samples differ in length")
    return mean_ci([x - y for x, y in zip(a, b)])
