"""Prometheus text exposition of `/metrics` (issue 5: "`/metrics` (Prometheus text)").

Engine numbers come from `engine.stats()`: scalars ending in `_total` become counters, other
scalars gauges (`kv_blocks_total`, a pool size, is exported as the gauge `kv_blocks_capacity`,
plus `kv_cache_usage_ratio`), the engine's cumulative histograms (`utils/histogram.py`, per
request seconds) histograms; a plain list of values is bucketed here the same way. The server
adds its own HTTP request counter (by route and status). Format: text exposition 0.0.4.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Iterable, Mapping

from minicpm4.utils.histogram import LATENCY_BUCKETS, Histogram, HistogramSnapshot

PREFIX = "minicpm4"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = LATENCY_BUCKETS
_HELP = {
    "num_running": "Requests in the running batch.",
    "num_waiting": "Requests waiting to be scheduled.",
    "kv_blocks_used": "KV-cache blocks in use.",
    "kv_blocks_capacity": "KV-cache blocks in the pool.",
    "kv_cache_usage_ratio": "Fraction of the KV-cache blocks in use.",
    "requests_aborted_total": "Requests aborted (client gone, shutdown).",
    "steps_total": "Engine steps run.",
    "prompt_tokens_total": "Prompt tokens processed.",
    "generation_tokens_total": "Tokens generated.",
    "requests_finished_total": "Requests finished (any reason).",
    "preemptions_total": "Requests preempted for lack of KV blocks.",
    "prefix_cache_hit_tokens_total": "Prompt tokens served from the prefix cache.",
    "time_to_first_token_seconds": "Arrival to first generated token.",
    "time_per_output_token_seconds": "Per request: first token to finish / (tokens - 1).",
    "queue_time_seconds": "Arrival to first scheduling.",
    "e2e_latency_seconds": "Arrival to finish.",
}


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_text(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        value = str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
        parts.append(f'{key}="{value}"')
    return "{" + ",".join(parts) + "}"


def _histogram(name: str, values: HistogramSnapshot | Iterable[float],
               labels: Mapping[str, str]) -> list[str]:
    if not isinstance(values, HistogramSnapshot):
        hist = Histogram(BUCKETS)
        for v in values:
            if v is not None:
                hist.observe(float(v))
        values = hist.snapshot()
    lines = [f"{name}_bucket{_label_text({**labels, 'le': _num(bound)})} {n}"
             for bound, n in zip(values.bounds, values.cumulative)]
    lines.append(f"{name}_bucket{_label_text({**labels, 'le': '+Inf'})} {values.count}")
    lines.append(f"{name}_sum{_label_text(labels)} {_num(values.sum)}")
    lines.append(f"{name}_count{_label_text(labels)} {values.count}")
    return lines


def render(stats: Mapping[str, Any], http_requests: Counter, *,
           labels: Mapping[str, str] | None = None) -> str:
    """The whole exposition: engine stats (labelled with the model name) + HTTP counter."""
    labels = dict(labels or {})
    stats = dict(stats)
    if "kv_blocks_total" in stats:
        stats["kv_blocks_capacity"] = capacity = stats.pop("kv_blocks_total")
        if capacity and "kv_blocks_used" in stats:
            stats["kv_cache_usage_ratio"] = stats["kv_blocks_used"] / capacity
    out: list[str] = []
    for key in sorted(stats):
        value = stats[key]
        name = f"{PREFIX}_{key}"
        help_text = _HELP.get(key, key.replace("_", " ") + ".")
        if isinstance(value, (list, tuple, HistogramSnapshot)):
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
            out += _histogram(name, value, labels)
        elif isinstance(value, (int, float)):
            kind = "counter" if key.endswith("_total") else "gauge"
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}",
                    f"{name}{_label_text(labels)} {_num(value)}"]
    name = f"{PREFIX}_http_requests_total"
    out += [f"# HELP {name} HTTP requests answered, by route and status.",
            f"# TYPE {name} counter"]
    for (route, status), count in sorted(http_requests.items()):
        out.append(f"{name}{_label_text({'route': route, 'status': str(status)})} {count}")
    return "\n".join(out) + "\n"
