"""Figures from a server's own Prometheus metrics: counters, and histogram quantiles over the
window between two scrapes (bucket counts subtracted, then interpolated as Prometheus'
`histogram_quantile` does)."""
from __future__ import annotations

import math
from dataclasses import dataclass


def samples(text: str) -> list:
    from prometheus_client.parser import text_string_to_metric_families

    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for s in samples(text)
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def buckets(text: str, histogram: str) -> dict[float, float]:
    """Cumulative bucket counts of `histogram` (summed over its label sets), by upper bound."""
    out: dict[float, float] = {}
    for s in samples(text):
        if s.name == f"{histogram}_bucket":
            bound = float(s.labels["le"])
            out[bound] = out.get(bound, 0.0) + s.value
    return out


@dataclass
class Window:
    """Metrics between two scrapes of the same server."""

    before: str
    after: str

    def delta(self, name: str, **labels: str) -> float:
        return total(self.after, name, **labels) - total(self.before, name, **labels)

    def quantile(self, histogram: str, q: float) -> float:
        """The q-quantile of the observations made in the window (NaN when there were none)."""
        a, b = buckets(self.after, histogram), buckets(self.before, histogram)
        cumulative = sorted((bound, count - b.get(bound, 0.0)) for bound, count in a.items())
        return bucket_quantile(cumulative, q)

    def count(self, histogram: str) -> float:
        return self.delta(f"{histogram}_count")


def bucket_quantile(cumulative: list[tuple[float, float]], q: float) -> float:
    """Linear interpolation inside the bucket holding rank q·n; the +Inf bucket answers with the
    largest finite bound."""
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return cumulative[-1][0]
