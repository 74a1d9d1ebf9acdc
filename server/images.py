"""Images from message parts: base64 ``data:`` URLs, or http(s) URLs from allow-listed hosts only
(never local files), each with size caps and decompression-bomb and truncation checks."""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import warnings
from urllib.parse import urlsplit

import httpx
from PIL import Image

from server.errors import APIError


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise APIError(413, f"image of {w}x{h} pixels exceeds the limit of {max_pixels}", param="messages")
            img.load()
            return img.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise APIError(413, f"image rejected: {e}", param="messages") from None
    except Exception as e:  # not an image, truncated, unsupported format
        raise APIError(400, f"could not decode image: {type(e).__name__}: {e}", param="messages") from None


def decode_data_url(url: str, max_bytes: int, max_pixels: int) -> Image.Image:
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:") or ";base64" not in head:
        raise APIError(400, "image data URLs must look like data:image/<type>;base64,<data>", param="messages")
    mime = head[5:].split(";")[0]
    if not mime.startswith("image/"):
        raise APIError(400, f"unsupported image MIME type {mime!r}", param="messages")
    if len(payload) * 3 // 4 > max_bytes:
        raise APIError(413, f"image exceeds {max_bytes} bytes", param="messages")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image data URL is not valid base64", param="messages") from None
    return _open(data, max_pixels)


def _public_address(host: str) -> str:
    """The host's address, refusing hosts that resolve to any loopback, private, link-local, reserved
    or multicast address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise APIError(400, f"cannot resolve image host {host!r}", param="messages") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if not ip.is_global or ip.is_multicast:
            raise APIError(400, f"image host {host!r} resolves to a non-public address", param="messages")
    return infos[0][4][0]


async def fetch_url(url: str, allowed_hosts: list[str], timeout: float, max_bytes: int, max_pixels: int,
                    transport: httpx.AsyncBaseTransport | None = None) -> Image.Image:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise APIError(400, f"unsupported image URL scheme {parts.scheme!r}", param="messages")
    host = (parts.hostname or "").lower()
    if host not in {h.lower() for h in allowed_hosts}:
        raise APIError(400, f"image URLs from host {host!r} are not allowed", param="messages")
    ip = _public_address(host)  # before any connection is made
    # Connect to the address just checked (not to a second lookup, which DNS rebinding could turn
    # private), naming the host in the Host header and in TLS (SNI and certificate check).
    netloc = (f"[{ip}]" if ":" in ip else ip) + (f":{parts.port}" if parts.port else "")
    target = parts._replace(netloc=netloc).geturl()
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    try:
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport) as client:
            async with client.stream("GET", target, headers={"Host": parts.netloc.rsplit("@", 1)[-1]},
                                     extensions=extensions) as resp:
                if resp.status_code != 200:
                    raise APIError(400, f"image URL answered {resp.status_code}", param="messages")
                buf = bytearray()
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    if len(buf) > max_bytes:
                        raise APIError(413, f"image exceeds {max_bytes} bytes", param="messages")
    except httpx.HTTPError as e:
        raise APIError(400, f"could not fetch image URL: {type(e).__name__}", param="messages") from None
    return _open(bytes(buf), max_pixels)
