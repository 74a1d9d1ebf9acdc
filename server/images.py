"""Images from message parts: ``data:`` URLs (RFC 2397), or http(s) URLs from allow-listed hosts only
(never local files), each with size, pixel and aspect-ratio caps, decompression-bomb and truncation
checks, and a conversion to RGB by each mode's meaning (transparent pixels onto white, as vLLM does).
A decoded image is then held only at the size the models' processors resize it to (``processor_side``):
four 4096x4096 PNGs held about 390 MB until their request ended.

Decoding is CPU work of up to a few hundred milliseconds: ``load_image`` runs it in a worker thread (the
server's preprocessing executor) so that the event loop (and ``/health``) never waits for it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import re
import socket
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from server.errors import APIError


@dataclass(frozen=True)
class ImageLimits:
    """What an image may cost: encoded bytes, decoded pixels, and the ratio of its long side to its short
    side (a processor resizes the short side to its input size, so the long side's cost grows with it);
    ``keep_side``: decoded images whose short side is longer are reduced to it, keeping their aspect ratio
    (``processor_side``; None: kept as decoded)."""

    max_bytes: int = 4 * 2**20
    max_pixels: int = 4096 * 4096
    max_aspect_ratio: float = 20.0
    keep_side: int | None = None


# Image processors whose output, for an image larger than their size settings in both sides, depends on
# the image's aspect ratio only: each resizes to a size given in pixels (CLIP and SigLIP: the short side or
# a fixed size, then a centre crop; Gemma 3: a fixed size; LLaVA-NeXT and -OneVision: the grid resolution
# that fits the aspect ratio best, among image_grid_pinpoints, when the image is larger than all of them).
# Others (Qwen2-VL's pixel budget, tiling and pan-and-scan processors, ...) keep images as decoded.
KEEPS_ASPECT_ONLY = {"CLIPImageProcessor", "SiglipImageProcessor", "Gemma3ImageProcessor", "LlavaNextImageProcessor",
                     "LlavaOnevisionImageProcessor"}
SIDE_KEYS = ("height", "width", "shortest_edge", "longest_edge")


def processor_side(image_processor) -> int | None:
    """The longest side, in pixels, that ``image_processor`` (a transformers image processor) resizes or
    crops an image to: its ``size`` and ``crop_size`` (height, width, shortest or longest edge) and its
    ``image_grid_pinpoints``. An image whose short side is longer can be reduced to it (keeping its aspect
    ratio) before the processor runs, and the processor computes the same sizes from it (its pixels then
    differ by the two resamplings only). None when that is not known to hold: a class outside
    ``KEEPS_ASPECT_ONLY``, ``do_resize`` off, pan-and-scan on, or a pixel-count setting."""
    if image_processor is None or type(image_processor).__name__.removesuffix("Fast") not in KEEPS_ASPECT_ONLY:
        return None
    if not getattr(image_processor, "do_resize", True) or getattr(image_processor, "do_pan_and_scan", False):
        return None
    sides = []
    for attr in ("size", "crop_size"):
        v = getattr(image_processor, attr, None)
        if isinstance(v, int):
            sides.append(v)
            continue
        if v is None:
            continue
        get = v.get if isinstance(v, dict) else lambda k, v=v: getattr(v, k, None)
        if any(get(k) for k in ("max_height", "max_width", "min_pixels", "max_pixels")):
            return None
        sides += [int(get(k)) for k in SIDE_KEYS if get(k)]
    sides += [int(x) for pair in getattr(image_processor, "image_grid_pinpoints", None) or [] for x in pair]
    return max(sides) if sides else None


def reduce_to(img: Image.Image, side: int | None) -> Image.Image:
    """``img`` with its short side reduced to ``side`` pixels (aspect ratio kept, the long side rounded;
    PIL's antialiased bicubic resize), or ``img`` itself when its short side is at most ``side``."""
    w, h = img.size
    if side is None or min(w, h) <= side:
        return img
    scale = side / min(w, h)
    size = (side, max(side, round(h * scale))) if w <= h else (max(side, round(w * scale)), side)
    return img.resize(size, Image.Resampling.BICUBIC)


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB image with the same meaning as ``img``, whatever its PIL mode: transparency (alpha bands,
    palette or colour-key transparency, 16-bit grey included) composited onto white (vLLM's
    ``rgba_to_rgb``), 16-bit grey scaled to 8 bits (PIL's own conversion clips it at 255), 32-bit integer
    grey from the smallest of 8, 16, 24 or 32 bits that holds its values, float grey read as
    0..1 when it lies there (else 0..255), CIELAB through a colour transform; the rest by PIL."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        if mode == "I":  # 32-bit integers of no declared depth: the smallest of 8, 16, 24, 32 bits that holds them
            bits = next((b for b in (8, 16, 24, 32) if a.max(initial=0) < 2**b), 32)
        else:
            bits = 16
        grey = Image.fromarray(np.clip(np.rint(a * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8), "L")
        key = img.info.get("transparency")  # a 16-bit grey PNG's colour key (tRNS), in the raw values
        if isinstance(key, int):
            grey.putalpha(Image.fromarray(np.where(a == key, 0, 255).astype(np.uint8), "L"))
        img = grey
    elif mode == "F":
        a = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 1.0
        img = Image.fromarray(np.clip(np.rint(a * scale), 0, 255).astype(np.uint8), "L")
    elif mode == "LAB":
        lab_to_srgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        img = ImageCms.applyTransform(img, lab_to_srgb)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


# Raster formats clients send; the rest of PIL's decoders (EPS through Ghostscript, WMF, PSD, FITS, ...) are
# not reachable from a request.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "ICO", "PPM", "TGA", "JPEG2000", "AVIF", "QOI")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            w, h = img.size
            if w * h > limits.max_pixels:
                raise APIError(413, f"image of {w}x{h} pixels exceeds the limit of {limits.max_pixels}", param="messages")
            if max(w, h) > limits.max_aspect_ratio * max(1, min(w, h)):
                raise APIError(400, f"image of {w}x{h} pixels: its aspect ratio exceeds the limit of "
                                    f"{limits.max_aspect_ratio:g} to 1", param="messages")
            if limits.keep_side and img.format == "JPEG":
                img.draft(None, (limits.keep_side, limits.keep_side))  # decoded at 1/2, 1/4 or 1/8 when that is enough
            img.load()
            # a camera's EXIF Orientation (a phone photo held upright is stored sideways): applied, as vLLM's
            # image loader and browsers do; then only the pixels the processors need are kept (the full
            # decode is let go here, not held until the request ends)
            return reduce_to(to_rgb(ImageOps.exif_transpose(img)), limits.keep_side)
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # Pillow refuses it at open, before our check, quoting its own limit: say ours
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"of {int(n.group(1))} pixels " if n else ""
        raise APIError(413, f"image {size}exceeds the limit of {limits.max_pixels} pixels", param="messages") from None
    except UnidentifiedImageError:
        raise APIError(400, f"could not decode image: not an image in a supported format ({', '.join(FORMATS)})",
                       param="messages") from None
    except Exception as e:  # truncated, corrupt
        raise APIError(400, f"could not decode image: {type(e).__name__}: {e}", param="messages") from None


def is_data_url(url: str) -> bool:
    return url.lstrip()[:5].lower() == "data:"


# What real clients put in base64 payloads beside the standard alphabet: line breaks (MIME-style
# wrapping), the URL-safe alphabet, missing padding, percent-encoding.
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def parse_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of an RFC 2397 ``data:[<media type>][;base64],<data>`` URL. Scheme, media type and the
    base64 marker are case-insensitive; a media type other than ``image/*`` is refused (400), an empty
    one or ``application/octet-stream`` is left to the image decoder. Written here because the standard
    library's ``urllib.request.DataHandler`` matches ``;base64`` case-sensitively and decodes without
    validating. Raises APIError 400 (malformed) or 413 (over ``max_bytes``)."""
    _, _, rest = url.strip().partition(":")
    head, sep, payload = rest.partition(",")
    if not sep:
        raise APIError(400, "image data URLs must look like data:image/<type>;base64,<data>", param="messages")
    params = [p.strip().lower() for p in head.split(";")]
    mime, is_base64 = params[0], "base64" in params[1:]
    if mime and mime != "application/octet-stream" and not mime.startswith("image/"):
        raise APIError(400, f"unsupported image MIME type {mime!r}", param="messages")
    if len(payload) * 3 // 4 > max_bytes if is_base64 else len(payload) > 3 * max_bytes:
        raise APIError(413, f"image exceeds {max_bytes} bytes", param="messages")
    if not is_base64:
        data = unquote_to_bytes(payload)
    else:
        raw = (unquote_to_bytes(payload) if "%" in payload else payload.encode("ascii", "replace"))
        raw = b"".join(raw.split()).translate(_URLSAFE).rstrip(b"=")
        try:
            data = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "image data URL is not valid base64", param="messages") from None
    if len(data) > max_bytes:
        raise APIError(413, f"image exceeds {max_bytes} bytes", param="messages")
    return data


def decode_data_url(url: str, limits: ImageLimits) -> Image.Image:
    """An RGB image from a ``data:`` URL (blocking: CPU work; see ``load_image``)."""
    return _open(parse_data_url(url, limits.max_bytes), limits)


async def load_image(url: str, limits: ImageLimits, allowed_hosts: list[str], timeout: float,
                     executor: Executor | None = None) -> Image.Image:
    """An RGB image from a message's ``image_url``; decoding runs in ``executor`` (default: asyncio's)."""
    if is_data_url(url):
        return await asyncio.get_running_loop().run_in_executor(executor, decode_data_url, url, limits)
    return await fetch_url(url, allowed_hosts, timeout, limits, executor=executor)


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


async def fetch_url(url: str, allowed_hosts: list[str], timeout: float, limits: ImageLimits,
                    transport: httpx.AsyncBaseTransport | None = None, executor: Executor | None = None) -> Image.Image:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise APIError(400, f"unsupported image URL scheme {parts.scheme!r}", param="messages")
    host = (parts.hostname or "").lower()
    if host not in {h.lower() for h in allowed_hosts}:
        raise APIError(400, f"image URLs from host {host!r} are not allowed", param="messages")
    ip = await asyncio.to_thread(_public_address, host)  # before any connection is made (DNS off the loop)
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
                    if len(buf) > limits.max_bytes:
                        raise APIError(413, f"image exceeds {limits.max_bytes} bytes", param="messages")
    except httpx.HTTPError as e:
        raise APIError(400, f"could not fetch image URL: {type(e).__name__}", param="messages") from None
    return await asyncio.get_running_loop().run_in_executor(executor, _open, bytes(buf), limits)
