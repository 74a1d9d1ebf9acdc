"""How long ``/health`` takes to answer while costly images are being processed, against the same server
idle (measured in the same run): whether image decoding and preprocessing keep the event loop free.

    vlm-steer bench health --url http://127.0.0.1:8000 --image-size 1x20000 --requests 4
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
import statistics
import time

import httpx
from PIL import Image


def png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "white").save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _poll(client: httpx.AsyncClient, url: str, until: asyncio.Event | None, seconds: float, interval: float) -> list[float]:
    """/health latencies (seconds), polled every ``interval`` until ``until`` is set (or for ``seconds``)."""
    out, end = [], time.monotonic() + seconds
    while (until is None and time.monotonic() < end) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        await client.get(url + "/health")
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(interval)
    return out


def _summary(lat: list[float]) -> dict:
    lat = sorted(lat)
    return {"polls": len(lat), "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * lat[math.ceil(0.99 * len(lat)) - 1],
            "max_ms": 1e3 * lat[-1]}


async def run_health(url: str, size: tuple[int, int], requests: int, model: str = "vlm", idle_seconds: float = 2.0,
                     interval: float = 0.005) -> dict:
    """/health latency idle, then while ``requests`` chat requests with a ``size`` image are in flight."""
    image = png_data_url(*size)
    body = {"model": model, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "describe the image ."}]}]}
    async with httpx.AsyncClient(timeout=120) as client:
        idle = await _poll(client, url, None, idle_seconds, interval)
        done = asyncio.Event()

        async def chats() -> list[int]:
            t0 = time.perf_counter()
            rs = await asyncio.gather(*(client.post(url + "/v1/chat/completions", json=body) for _ in range(requests)))
            chats.seconds = time.perf_counter() - t0
            done.set()
            return [r.status_code for r in rs]

        statuses, busy = await asyncio.gather(chats(), _poll(client, url, done, 0, interval))
    return {"image": f"{size[0]}x{size[1]}", "image_bytes": len(base64.b64decode(image.split(",", 1)[1])),
            "requests": requests, "statuses": statuses, "requests_seconds": chats.seconds,
            "idle": _summary(idle), "busy": _summary(busy or idle)}


def format_health(rep: dict) -> str:
    i, b = rep["idle"], rep["busy"]
    return (f"image {rep['image']} ({rep['image_bytes']} bytes) x {rep['requests']}: statuses {rep['statuses']}, "
            f"{rep['requests_seconds']:.2f} s\n"
            f"/health idle: p50 {i['p50_ms']:.1f} ms, p99 {i['p99_ms']:.1f} ms, max {i['max_ms']:.1f} ms ({i['polls']} polls)\n"
            f"/health busy: p50 {b['p50_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, max {b['max_ms']:.1f} ms ({b['polls']} polls); "
            f"max busy / max idle = {b['max_ms'] / i['max_ms']:.1f}x")
