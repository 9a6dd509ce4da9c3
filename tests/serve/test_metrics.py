"""Prometheus text exposition of /metrics (serve/metrics.py): types, cumulative buckets,
label escaping, one well-formed sample per line."""

from __future__ import annotations

import re
from collections import Counter

from minicpm4.serve.metrics import BUCKETS, render

SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*",?)*\})?'
                    r' [-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|\+Inf|-Inf|NaN)$')


def test_render() -> None:
    stats = {"num_running": 3, "kv_blocks_used": 5, "kv_blocks_total": 20,
             "generation_tokens_total": 1234, "e2e_latency_seconds": [0.004, 0.2, 0.2, 7.0, 500.0]}
    http = Counter({("/v1/chat/completions", 200): 7, ("other", 404): 1})
    text = render(stats, http, labels={"model_name": 'we"ird\\name'})
    lines = text.strip().splitlines()
    for line in lines:
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert "# TYPE minicpm4_generation_tokens_total counter" in lines
    assert "# TYPE minicpm4_num_running gauge" in lines
    assert "# TYPE minicpm4_kv_blocks_capacity gauge" in lines  # a size, not a counter
    assert 'minicpm4_kv_cache_usage_ratio{model_name="we\\"ird\\\\name"} 0.25' in lines
    buckets = [int(ln.rsplit(" ", 1)[1]) for ln in lines
               if ln.startswith("minicpm4_e2e_latency_seconds_bucket")]
    assert len(buckets) == len(BUCKETS) + 1
    assert buckets == sorted(buckets) and buckets[0] == 1 and buckets[-1] == 5
    assert buckets[BUCKETS.index(0.25)] == 3 and buckets[BUCKETS.index(10.0)] == 4
    assert any(ln.startswith("minicpm4_e2e_latency_seconds_count") and ln.endswith(" 5")
               for ln in lines)
    assert 'minicpm4_http_requests_total{route="/v1/chat/completions",status="200"} 7' in lines
