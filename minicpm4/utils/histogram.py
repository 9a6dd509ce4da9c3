"""Cumulative histograms for the engine's per-request timings (issue 5: `/metrics`).

Prometheus histograms are counters: a bucket count, the sum and the count only ever grow.
The engine observes each finished request's times once (`Histogram.observe`, O(log buckets)),
and a `/metrics` scrape copies a few numbers (`Histogram.snapshot`) instead of every sample.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0)
"""Upper bounds (seconds) of the engine's latency histograms; +Inf is implied."""


@dataclass(frozen=True)
class HistogramSnapshot:
    bounds: tuple[float, ...]
    cumulative: tuple[int, ...]
    """Observations <= bounds[i], for each bound (Prometheus' `le` buckets)."""
    sum: float
    count: int


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"histogram bounds must be strictly increasing, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value
        if i < len(self._counts):
            self._counts[i] += 1
        self._sum += value
        self._count += 1

    def snapshot(self) -> HistogramSnapshot:
        cumulative, running = [], 0
        for c in self._counts:
            running += c
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), self._sum, self._count)
