"""What a client may make the server hold before its request is read: a deadline for the request line and
headers (the head), limits on the head's size and on its number of header fields, and a deadline for the
body. Past them the client gets an answer in the OpenAI error shape and its connection is closed:

- head not in within ``header_timeout`` seconds (from the connection's opening, or on a kept-alive
  connection from the end of the previous response): 408 when part of a request had come, else the
  connection is closed without a word (a silent idle connection, as uvicorn's keep-alive timeout does);
- head larger than ``max_header_bytes`` or with more than ``max_headers`` fields: 431 (RFC 6585);
- body not in within ``body_timeout`` seconds of the head: 408 (RFC 9110) with ``Connection: close``.

The head's limits and deadline live in ``BoundedHttpToolsProtocol``, a subclass of uvicorn's httptools
protocol (the one uvicorn[standard] runs), because they must act before any ASGI application exists for the
request. Written here because neither uvicorn nor httptools (llhttp) has them: uvicorn's only read timeout
is ``timeout_keep_alive`` (between requests), and llhttp accumulates a header of any size (a 64 MB header
held the event loop 1.8 s). uvicorn's h11 protocol has a size limit (``h11_max_incomplete_event_size``),
but it answers 400 for it, counts no fields, has no head deadline either, and is pure Python. The body's
deadline is the ASGI middleware ``BodyDeadline``: it wraps ``receive``, so it covers any route that reads a
body, and its 408 goes through the app's error handlers (counted, with the request id).
"""

from __future__ import annotations

import asyncio
import json

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.errors import APIError


class HeadTooLarge(Exception):
    """Raised inside the parser's callbacks to stop it (httptools then raises HttpParserCallbackError)."""


def _error_response(status: int, message: str, default_headers) -> bytes:
    body = json.dumps(APIError(status, message).body()).encode()
    head = [STATUS_LINE[status]]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
    return b"".join(head) + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's ``HttpToolsProtocol`` with a head deadline and head limits (see the module docstring). Set
    the class attributes with ``bounded_protocol``.

    The head's size counts the request target and each field as ``name: value\\r\\n``. A head still
    incomplete is counted as it arrives (every chunk read while a head is being read, whole), so that a
    huge header is refused after about ``max_header_bytes`` plus one socket read, before httptools has
    gathered it. (A chunk in which a head ends is not counted: the head's parsed size is.)"""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._in_head = True  # between a message's end (or the connection's start) and its headers' end
        self._head_started = False  # some bytes of the current head have come
        self._head_bytes = 0  # bytes of the current head received in chunks that held nothing else
        self._head_size = 0  # the current head's target and fields, as parsed
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_done = 0  # heads completed on this connection

    # -- the head deadline

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_deadline_passed)

    def _cancel_head_deadline(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_deadline_passed(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # closed already, or a response is being written (the deadline is armed only between them)
        if self._head_started:
            self._refuse(408, f"the request headers were not received within {self.header_timeout:g} s")
        else:
            self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close; only close while a response is being written (a pipelined request's
        head: an answer now would cut into that response)."""
        self._cancel_head_deadline()
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_error_response(status, message, self.server_state.default_headers))
        self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the next request's head is due within the deadline (and the rest of an unread body with it),
        # unless a pipelined request was started by the call above or the connection is closing
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self._arm_head_deadline()

    # -- the head's size and fields

    def data_received(self, data: bytes) -> None:
        # uvicorn's ``data_received`` (keep-alive, parser errors, upgrades), with the head's limits
        self._unset_keepalive_if_required()
        in_head, heads = self._in_head, self._heads_done  # a head was being read before this chunk...
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, HeadTooLarge):
                self._refuse(431, str(e.__context__))
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if in_head and self._heads_done == heads:  # ...and none ended in it: the chunk was all head
            self._head_bytes += len(data)
            if self._head_bytes > self.max_header_bytes:
                self._refuse(431, f"the request headers exceed {self.max_header_bytes} bytes")

    def _bad_request(self) -> None:
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    def _count(self, size: int, fields: int = 0) -> None:
        self._head_size += size
        self._head_fields += fields
        if self._head_fields > self.max_headers:
            raise HeadTooLarge(f"the request has more than {self.max_headers} header fields")
        if self._head_size > self.max_header_bytes:
            raise HeadTooLarge(f"the request headers exceed {self.max_header_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_started = True, True
        self._head_bytes = self._head_size = self._head_fields = 0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4, 1)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._head_started = False, False
        self._heads_done += 1
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True


def bounded_protocol(max_header_bytes: int, max_headers: int, header_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """``BoundedHttpToolsProtocol`` with these limits, for ``uvicorn.Config(http=...)``."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"max_header_bytes": max_header_bytes, "max_headers": max_headers, "header_timeout": header_timeout})


class BodyDeadline:
    """ASGI middleware: an HTTP request's body must be in within ``timeout`` seconds of the application's
    call (its headers' end). A ``receive`` still waiting for the body then raises ``APIError`` 408 with
    ``Connection: close`` into the route, whose error handler answers it; uvicorn closes the connection
    after it. Once the body is in, ``receive`` is the server's own (a stream's disconnect wait is not
    bounded)."""

    def __init__(self, app, timeout: float):
        self.app, self.timeout = app, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = asyncio.get_running_loop().time() + self.timeout
        body_done = False

        async def bounded_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise APIError(408, f"the request body was not received within {self.timeout:g} s",
                               headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        await self.app(scope, bounded_receive, send)
