"""Who is asking: the bearer-token check of ``--api-keys`` and the request id (the client's
``X-Request-Id`` when reasonable)."""

from __future__ import annotations

from fastapi import Request

from server.errors import APIError

MAX_REQUEST_ID = 128


def authorize(request: Request, keys: list[str]) -> None:
    """401 unless the request carries one of ``keys`` as a bearer token (no keys: open)."""
    if not keys:
        return
    header = request.headers.get("authorization", "")
    if not header.startswith("Bearer ") or header[7:] not in keys:
        raise APIError(401, "invalid or missing API key", headers={"WWW-Authenticate": "Bearer"})


def client_request_id(request: Request) -> str | None:
    """The client's ``X-Request-Id`` when it is a reasonable one (at most 128 printable ASCII characters);
    otherwise the server assigns its own (it is echoed and written to the log)."""
    rid = request.headers.get("x-request-id")
    return rid if rid and len(rid) <= MAX_REQUEST_ID and rid.isascii() and rid.isprintable() else None
