"""Soak: a few thousand mixed requests (every steering method, streaming, some clients hanging up)
on loopback: zero 5xx, every row freed, memory flat after warm-up."""

import asyncio
import gc
import os

import httpx

from bench.load import run_load
from shapeworld.commands import images
from tests.server.conftest import start

METHODS = ["none", "tita", "fisao", "tita+fisao", "vcd"]  # those the engine has (vllm: no VCD)


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_soak_mixed_requests_memory_flat_zero_5xx(steering_engine):
    methods = [m for m in METHODS if all(p in steering_engine.available_methods for p in m.split("+"))]
    with start(steering_engine, max_queue=64, max_batch=16) as srv:
        load = lambda n, seed: asyncio.run(run_load(srv.url, concurrency=16, requests=n, methods=methods, source=images, model="shapeworld",
                                                    max_tokens=4, disconnect_fraction=0.1, seed=seed))
        warm = load(500, 1)
        gc.collect()
        before = rss_mb()
        soak = load(2000, 2)
        gc.collect()
        after = rss_mb()
        for rep in (warm, soak):
            assert rep["errors_5xx"] == 0 and set(rep["statuses"]) == {"200"}, rep["statuses"]
            assert rep["completed"] + rep["disconnected"] == rep["requests"]
        assert srv.state.scheduler.num_running == 0 and srv.state.scheduler.num_waiting == 0
        assert after - before < 64, f"RSS grew {after - before:.0f} MB over 2,000 requests ({before:.0f} -> {after:.0f} MB)"
        assert httpx.get(srv.url + "/health").status_code == 200
        print(f"soak: 2,500 requests, RSS {before:.0f} -> {after:.0f} MB, statuses {soak['statuses']}, "
              f"disconnected {soak['disconnected']}")
