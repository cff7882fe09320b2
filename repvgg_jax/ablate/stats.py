"""Means, 95% confidence intervals and paired differences over an ablation's seeds.

Every row trains once per seed, the seeds the same for every row, so row ``r``
and the reference row are paired seed by seed: the difference of their top-1s
on seed ``s`` removes what the seed alone does (the data order, the
initialisation), and the interval of the mean difference is narrower than the
rows' own intervals suggest. Intervals are Student t's over the seeds (n - 1
degrees of freedom); with one seed there is none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean and the half-width of its confidence interval (NaN for one value)."""

  mean: float
  half_width: float
  count: int

  @property
  def excludes_zero(self) -> bool:
    """Whether the interval lies wholly above or below zero (a distinguishable difference)."""
    return not math.isnan(self.half_width) and abs(self.mean) > self.half_width


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
  """The mean of ``values`` and its Student t confidence interval's half-width."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    raise ValueError('No values to average.')
  if values.size == 1:
    return Interval(float(values[0]), math.nan, 1)
  sem = values.std(ddof=1) / math.sqrt(values.size)
  quantile = stats.t.ppf(0.5 + confidence / 2, df=values.size - 1)
  return Interval(float(values.mean()), float(quantile * sem), int(values.size))


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Interval:
  """``values - reference`` seed by seed (the seeds both have), averaged with its interval."""
  seeds = sorted(values.keys() & reference.keys())
  if not seeds:
    raise ValueError('The row and the reference row share no seed.')
  return interval([values[seed] - reference[seed] for seed in seeds])


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
  """``(first quartile, median, third quartile)``."""
  q1, median, q3 = np.percentile(np.asarray(values, np.float64), [25, 50, 75])
  return float(q1), float(median), float(q3)
