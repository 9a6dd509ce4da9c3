"""Cumulative latency histograms (utils/histogram.py) behind `/metrics`: Prometheus `le`
semantics (a value equal to a bound falls in that bucket), +Inf only in the count, counts
that only grow, and the engine's stats carrying them."""

from __future__ import annotations

import pytest

from minicpm4.serve.metrics import render
from minicpm4.utils.histogram import Histogram, HistogramSnapshot


def test_buckets_are_cumulative_with_le_semantics() -> None:
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0, 99.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap == HistogramSnapshot((0.1, 1.0, 10.0), (2, 4, 5), pytest.approx(103.65), 6)
    h.observe(0.01)
    later = h.snapshot()
    assert all(b >= a for a, b in zip(snap.cumulative, later.cumulative))
    assert later.count == 7 and later.cumulative == (3, 5, 6)


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 0.5))
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1.0, 1.0))


def test_render_gives_the_same_lines_for_a_snapshot_and_for_raw_values() -> None:
    values = [0.004, 0.2, 0.2, 7.0, 500.0]
    h = Histogram()
    for v in values:
        h.observe(v)
    a = render({"e2e_latency_seconds": values}, {}, labels={"model": "m"})
    b = render({"e2e_latency_seconds": h.snapshot()}, {}, labels={"model": "m"})
    assert a == b and 'minicpm4_e2e_latency_seconds_bucket{model="m",le="0.25"} 3' in a


def test_engine_stats_count_every_finished_request(tiny_model) -> None:
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.engine.request import SamplingParams

    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64))
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    llm.generate([[5, 6, 7], [8, 9]], [params, params])
    first = llm.stats()["e2e_latency_seconds"]
    llm.generate([[5, 6]], [params])
    second = llm.stats()["e2e_latency_seconds"]
    assert isinstance(first, HistogramSnapshot) and (first.count, second.count) == (2, 3)
    assert second.sum >= first.sum > 0 and llm.stats()["time_to_first_token_seconds"].count == 3
    assert llm.stats()["time_per_output_token_seconds"].count == 3  # each made 3 tokens


def test_final_output_reports_the_request_decode_speed(tiny_model) -> None:
    from minicpm4.engine.config import EngineConfig
    from minicpm4.engine.llm import LLM
    from minicpm4.engine.request import SamplingParams

    llm = LLM(tiny_model, None, EngineConfig(block_size=8, num_kv_blocks=64))
    llm.add_request([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                    "r")
    outs = []
    while llm.has_unfinished():
        outs += llm.step()
    final = outs[-1]
    assert final.finished and all(o.tokens_per_s is None for o in outs[:-1])
    m = final.metrics
    expected = 5 / (m.finished_time - m.first_token_time)
    assert final.tokens_per_s == pytest.approx(expected) and final.tokens_per_s > 0
    assert m.time_per_output_token(1) is None  # one token: no decode speed
