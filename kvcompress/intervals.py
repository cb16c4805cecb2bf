"""Confidence intervals for evaluation scores (no SciPy needed)."""

from __future__ import annotations

import math
import random
from statistics import NormalDist


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and is not empty
    at 0 or n successes, which is where compressed caches often sit.
    """
    if n <= 0:
        raise ValueError(f"n: must be >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes: must be in [0, n={n}], got {successes}")
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(values, confidence: float = 0.95, *, resamples: int = 2000, seed: int = 0,
              strata=None) -> tuple[float, float]:
    """Percentile bootstrap interval ``(low, high)`` of the mean of ``values``.

    With ``strata`` (a label per value) each resample draws within each
    stratum and the statistic is the mean of the stratum means, e.g. a suite
    score averaged over tasks with cases resampled inside each task.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: need at least one value")
    _z(confidence)
    groups: dict = {}
    for i, v in enumerate(vals):
        groups.setdefault(strata[i] if strata is not None else 0, []).append(v)
    rnd = random.Random(seed)
    stats = []
    for _ in range(resamples):
        means = []
        for g in groups.values():
            n = len(g)
            means.append(sum(g[rnd.randrange(n)] for _ in range(n)) / n)
        stats.append(sum(means) / len(means))
    stats.sort()
    lo = stats[int(math.floor((1 - confidence) / 2 * (resamples - 1)))]
    hi = stats[int(math.ceil((1 + confidence) / 2 * (resamples - 1)))]
    return lo, hi


def paired(a, b, confidence: float = 0.95, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Paired comparison of two methods scored on the same items (texts,
    cases): ``a[i]`` and ``b[i]`` belong to item ``i``.

    Returns ``dict(mean, low, high, lower, n)``: the mean of ``a - b``, its
    percentile-bootstrap interval (items resampled, so the pairing is kept),
    the number of items where ``a < b`` and the number of items. Two
    methods whose own intervals overlap can still differ on every item; the
    paired interval is the one that says whether ``a`` is below ``b``.
    """
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        raise ValueError(f"b: expected one value per item of a ({len(a)}), got {len(b)}")
    if not a:
        raise ValueError("a: need at least one item")
    d = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap(d, confidence, resamples=resamples, seed=seed)
    return dict(mean=sum(d) / len(d), low=lo, high=hi, lower=sum(x < y for x, y in zip(a, b)), n=len(d))


__all__ = ["wilson", "bootstrap", "paired"]
