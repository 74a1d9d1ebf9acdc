"""Who is asking: the bearer-token check of ``--api-keys`` and the request id (the client's
``X-Request-Id`` when reasonable)."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError

MAX_REQUEST_ID = 128


def authorize(request: Request, keys: list[str]) -> None:
    """401 unless the request carries one of ``keys`` as a bearer token (no keys: open)."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].encode() if header.startswith("Bearer ") else b""
    # every key compared in constant time (hmac.compare_digest), none skipped: the time taken says nothing
    # about how much of a key matched or which key was near
    matched = [hmac.compare_digest(given, k.encode()) for k in keys]
    if not given or not any(matched):
        raise APIError(401, "invalid or missing API key", headers={"WWW-Authenticate": "Bearer"})


def client_request_id(request: Request) -> str | None:
    """The client's ``X-Request-Id`` when it is a reasonable one (at most 128 printable ASCII characters);
    otherwise the server assigns its own (it is echoed and written to the log)."""
    rid = request.headers.get("x-request-id")
    return rid if rid and len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable() else None
