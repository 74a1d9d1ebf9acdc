"""What one hostile request costs the others (issue 30, "bounded cost"), against a running server:

- ``header``: ``/health`` latency while one client sends a request with a huge header (64 MB by default),
  and how the server answers that client;
- ``prompt``: the latency of a small image request (8 tokens) alone, then beside a huge text prompt (6 MB
  by default), and how long the huge one takes to be refused;
- ``images``: the server process's resident memory (RSS, from ``/proc``) while 8 requests of 4 large
  PNGs (4096x4096 each) are in flight, against before them;
- ``idle``: how long connections that send nothing, headers only, or half a body stay open.

    python -m bench.bounds --url http://127.0.0.1:8000 --model-name vlm --case header
    python -m bench.bounds --url http://127.0.0.1:8000 --case prompt [--spaces]
    python -m bench.bounds --url http://127.0.0.1:8000 --case images --pid $(pgrep -f 'vlm-steer serve')

A benchmark, not a test: the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import socket
import statistics
import threading
import time
from urllib.parse import urlsplit

import httpx
from PIL import Image, ImageDraw


def _addr(url: str) -> tuple[str, int]:
    u = urlsplit(url)
    return u.hostname or "127.0.0.1", u.port or 80


def _poll_health(url: str, stop: threading.Event, out: list[float], interval: float = 0.01) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            c.get(url + "/health")
            out.append(time.perf_counter() - t0)
            time.sleep(interval)


def _summary(lat: list[float]) -> str:
    if not lat:
        return "no polls"
    lat = sorted(lat)
    return f"p50 {1e3 * statistics.median(lat):.1f} ms, max {1e3 * lat[-1]:.1f} ms ({len(lat)} polls)"


def _read_reply(s: socket.socket, timeout: float) -> str:
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, ConnectionError):
        pass
    return data.split(b"\r\n", 1)[0].decode("latin-1") or "(closed, no reply)"


def bench_header(url: str, megabytes: int) -> None:
    """One client sends ``POST /v1/chat/completions`` with an ``X-Big`` header of ``megabytes`` MB."""
    idle: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=_poll_health, args=(url, stop, idle))
    t.start()
    time.sleep(1.0)
    stop.set()
    t.join()
    busy: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=_poll_health, args=(url, stop, busy))
    t.start()
    t0 = time.perf_counter()
    sent, status = 0, None
    with socket.create_connection(_addr(url)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Big: ")
        chunk = b"a" * 2**20
        try:
            for _ in range(megabytes):
                s.sendall(chunk)
                sent += len(chunk)
            s.sendall(b"\r\nContent-Length: 2\r\n\r\n{}")
        except ConnectionError:
            status = "(connection closed by the server while sending)"
        reply = _read_reply(s, 30)
    took = time.perf_counter() - t0
    stop.set()
    t.join()
    print(f"header of {megabytes} MB: {sent / 2**20:.2f} MB sent, reply {reply!r} {status or ''} after {took:.2f} s")
    print(f"/health idle: {_summary(idle)}")
    print(f"/health while the header is sent: {_summary(busy)}")


def _small_body(model: str) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"model": model, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe the image ."}]}]}


def bench_prompt(url: str, model: str, megabytes: float, spaces: bool = False) -> None:
    """A small image request alone, then beside a text prompt of ``megabytes`` MB: words (too long for the
    context), or with ``spaces`` a few words between spaces (few tokens: admissible, and slow to encode)."""
    small = _small_body(model)
    words = "describe the red circle and the blue square . "
    n = int(megabytes * 2**20)
    text = "describe" + " " * n + "the image ." if spaces else words * (n // len(words))
    big = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": text}]}

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            alone = []
            for _ in range(3):
                t0 = time.perf_counter()
                r = await c.post(url + "/v1/chat/completions", json=small)
                alone.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

            async def beside() -> list[float]:  # small requests one after another while the big one is in flight
                out = []
                await asyncio.sleep(0.05)
                while not big_done.done():
                    t0 = time.perf_counter()
                    r = await c.post(url + "/v1/chat/completions", json=small)
                    assert r.status_code == 200, r.text
                    out.append(time.perf_counter() - t0)
                return out

            t0 = time.perf_counter()
            big_done = asyncio.ensure_future(c.post(url + "/v1/chat/completions", json=big))
            besides = await beside()
            rb = await big_done
            return alone, rb, time.perf_counter() - t0, besides

    alone, rb, tb, besides = asyncio.run(run())
    msg = rb.json().get("error", {}).get("message", "")[:100] if rb.status_code != 200 else ""
    print(f"small image request alone: {', '.join(f'{x:.2f}' for x in alone)} s")
    print(f"{len(text) / 2**20:.1f} MB prompt: {rb.status_code} after {tb:.2f} s {msg!r}")
    print(f"small image requests beside it (one after another, from 0.05 s): {', '.join(f'{x:.2f}' for x in besides)} s")


def large_png(side: int, seed: int) -> bytes:
    """A ``side`` x ``side`` PNG of a few hundred shapes (about 100 KB at 4096)."""
    rng = random.Random(seed)
    img = Image.new("RGB", (side, side), "white")
    d = ImageDraw.Draw(img)
    for _ in range(120):
        x, y, r = rng.randrange(side), rng.randrange(side), rng.randrange(20, side // 8)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def bench_images(url: str, model: str, pid: int, requests: int, images: int, side: int) -> None:
    """RSS of process ``pid`` while ``requests`` requests of ``images`` PNGs of ``side`` pixels are in flight."""
    pngs = [large_png(side, i) for i in range(images)]
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}} for p in pngs]
    body = {"model": model, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "describe the image ."}]}]}
    size = len(json.dumps(body))
    samples: list[float] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(_rss_mb(pid))
            time.sleep(0.02)

    before = _rss_mb(pid)
    t = threading.Thread(target=sample)
    t.start()

    async def run():
        async with httpx.AsyncClient(timeout=300) as c:
            t0 = time.perf_counter()
            rs = await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=body) for _ in range(requests)))
            return [r.status_code for r in rs], time.perf_counter() - t0

    statuses, took = asyncio.run(run())
    stop.set()
    t.join()
    print(f"{requests} requests x {images} PNGs of {side}x{side} ({size / 1e3:.0f} KB per request): statuses {statuses}, "
          f"{took:.2f} s")
    print(f"RSS of pid {pid}: {before:.0f} MB before, peak {max(samples):.0f} MB (+{max(samples) - before:.0f} MB), "
          f"{_rss_mb(pid):.0f} MB after")


def bench_idle(url: str, cap: float) -> None:
    """How long the server keeps connections that send nothing, headers only, or half a body (up to ``cap`` s)."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    cases = {"nothing": b"", "partial headers": head[:40], "headers only": head, "half a body": head + b"{" + b" " * 499}

    def one(name: str, data: bytes, out: dict):
        with socket.create_connection(_addr(url)) as s:
            t0 = time.perf_counter()
            if data:
                s.sendall(data)
            reply = _read_reply(s, cap)
            took = time.perf_counter() - t0
        out[name] = f"{reply!r} after {took:.2f} s" if took < cap else f"still open after {cap:.0f} s"

    out: dict = {}
    threads = [threading.Thread(target=one, args=(n, d, out)) for n, d in cases.items()]
    polls: list[float] = []
    stop = threading.Event()
    poller = threading.Thread(target=_poll_health, args=(url, stop, polls, 0.05))
    poller.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    poller.join()
    for name in cases:
        print(f"{name}: {out[name]}")
    print(f"/health meanwhile: {_summary(polls)}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model-name", default="vlm")
    p.add_argument("--case", choices=["header", "prompt", "images", "idle"], required=True)
    p.add_argument("--megabytes", type=float, default=None, help="header: 64; prompt: 6")
    p.add_argument("--spaces", action="store_true", help="prompt: an admissible prompt of spaces between words")
    p.add_argument("--pid", type=int, default=None, help="images: the server process")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--cap", type=float, default=30.0, help="idle: seconds to wait at most")
    a = p.parse_args(argv)
    if a.case == "header":
        bench_header(a.url, int(a.megabytes or 64))
    elif a.case == "prompt":
        bench_prompt(a.url, a.model_name, a.megabytes or 6, a.spaces)
    elif a.case == "images":
        if a.pid is None:
            p.error("--case images needs --pid")
        bench_images(a.url, a.model_name, a.pid, a.requests, a.images, a.side)
    else:
        bench_idle(a.url, a.cap)


if __name__ == "__main__":
    main()
