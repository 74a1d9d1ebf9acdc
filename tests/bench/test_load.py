"""The load tools against a live server: the overhead benchmark sends the same greedy requests through
the engine and through HTTP, so both sides must count the same tokens."""

import asyncio

from bench.load import format_overhead, run_overhead
from shapeworld.commands import images


def test_overhead_benchmark_compares_like_with_like(live, steering_engine):
    rep = asyncio.run(run_overhead(live.url, steering_engine, 4, images, model="shapeworld", max_tokens=12))
    assert rep["tokens"]["engine"] == rep["tokens"]["http"] > 0
    assert rep["http_over_engine"] > 0 and "HTTP / engine" in format_overhead(rep)
