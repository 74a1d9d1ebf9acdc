"""Hostile images: each is refused with a clear 4xx before it can cost memory or reach the network,
and the server stays healthy."""

import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from tests.server.conftest import start


def _png_bomb(side: int = 30000) -> bytes:
    """A valid PNG header claiming side x side pixels (1-bit grey), whose data would inflate to ~100 MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    raw = zlib.compress(row * 64, 9)  # only a few rows: the header is what matters
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _msg(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]


def _data(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


CASES = [
    ("decompression bomb", _data("image/png", _png_bomb()), 413, "image of 900000000 pixels exceeds the limit of 16777216 pixels"),
    ("truncated PNG", _data("image/png", _png()[:60]), 400, "could not decode image"),
    ("not an image", _data("image/png", b"GIF89a this is not really an image"), 400, "could not decode image"),
    ("wrong MIME type", _data("text/html", _png()), 400, "unsupported image MIME type"),
    ("invalid base64", "data:image/png;base64,@@@not-base64@@@", 400, "not valid base64"),
    ("raw bytes that are no image", "data:image/png,rawbytes", 400, "could not decode image"),
    ("no comma", "data:image/png;base64", 400, "data:image/<type>;base64"),
    ("local file", "file:///etc/passwd", 400, "scheme"),
    ("host not allow-listed", "http://images.example.invalid/a.png", 400, "not allowed"),
]


@pytest.mark.parametrize("name,url,status,match", CASES, ids=[c[0] for c in CASES])
def test_hostile_image_is_refused(live, name, url, status, match):
    r = httpx.post(live.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": _msg(url)}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert match in err["message"] and err["param"] == "messages.0.content.0.image_url.url" and err["code"] == status
    assert httpx.get(live.url + "/health").status_code == 200


def test_huge_base64_is_refused_by_size_before_decoding(steering_engine):
    with start(steering_engine, max_image_bytes=4096, max_body_bytes=2**20) as srv:
        url = _data("image/png", b"\x00" * 8000)
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": _msg(url)}, timeout=30)
        assert r.status_code == 413 and "exceeds 4096 bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "127.0.0.2", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "[::1]", "0.0.0.0"])
def test_allow_listed_hosts_resolving_to_private_addresses_are_refused_before_connecting(steering_engine, monkeypatch, host):
    """Even when the host name is allow-listed; the refusal comes before any connection (none is made)."""
    connects = []
    real_stream = httpx.AsyncClient.stream

    def watch(self, method, url, *a, **kw):
        connects.append(url)
        return real_stream(self, method, url, *a, **kw)

    monkeypatch.setattr(httpx.AsyncClient, "stream", watch)
    bare = host.strip("[]")
    with start(steering_engine, image_url_hosts=[bare]) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "shapeworld", "messages": _msg(f"http://{host}:9/x.png")},
                       timeout=30)
        assert r.status_code == 400 and "non-public" in r.json()["error"]["message"]
    assert connects == []


def test_fetch_connects_to_the_checked_address_not_a_second_lookup(monkeypatch):
    """DNS rebinding: the address checked is the one connected to (the request never reaches the network
    here: a mock transport records it)."""
    import asyncio
    import socket

    from server import images

    answers = iter([[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 0))],
                    [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]])  # a rebinding DNS server
    monkeypatch.setattr(images.socket, "getaddrinfo", lambda *a, **k: next(answers))
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=_png())

    img = asyncio.run(images.fetch_url("https://images.example.com:8443/cat.png", ["images.example.com"], 5, images.ImageLimits(2**20, 10**6),
                                       transport=httpx.MockTransport(handler)))
    assert img.size == (64, 64)
    (req,) = seen
    assert req.url.host == "93.184.216.34" and req.url.port == 8443 and req.url.path == "/cat.png"
    assert req.headers["host"] == "images.example.com:8443"
    assert req.extensions["sni_hostname"] == "images.example.com"
