"""Pearson's chi-square test, without scipy: the p-value is torch's regularized upper incomplete gamma."""

from __future__ import annotations

from collections import Counter

import torch


def chisquare(observed: list[float], expected: list[float]) -> float:
    """p-value of observed counts against expected counts (df = cells - 1)."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return chi2_sf(stat, len(observed) - 1)


def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def two_sample(a: list, b: list, min_expected: float = 5.0) -> float:
    """p-value that two samples of outcomes share one distribution (a 2 x K contingency table).

    Outcomes too rare for the test (expected count below ``min_expected`` in either sample) are
    pooled into one cell, as usual.
    """
    ca, cb = Counter(a), Counter(b)
    na, nb = len(a), len(b)
    cells, rare = [], [0, 0]
    for key in set(ca) | set(cb):
        total = ca[key] + cb[key]
        if min(total * na, total * nb) / (na + nb) < min_expected:
            rare[0] += ca[key]
            rare[1] += cb[key]
        else:
            cells.append((ca[key], cb[key]))
    if sum(rare):
        cells.append(tuple(rare))
    stat = 0.0
    for x, y in cells:
        total = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = total * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    return chi2_sf(stat, len(cells) - 1)
