"""Server-sent events that write as little as they can.

Starlette's ``StreamingResponse`` writes the headers at once, every chunk, then an empty end-of-body
chunk. Each write to a streaming client is a system call and a wake-up of the client, and on a small
model that is a measurable share of a token's time. Here the headers go out with the first events, and
the last events (a ``Last`` string) with the end of the body: two writes fewer per response, the bytes
on the wire unchanged (disconnect handling is Starlette's).
"""

from __future__ import annotations

from starlette.responses import StreamingResponse
from starlette.types import Send


class Last(str):
    """The final piece of an event stream: it goes out with the end of the body."""


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"

    async def stream_response(self, send: Send) -> None:
        started = False
        async for chunk in self.body_iterator:
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                started = True
            last = isinstance(chunk, Last)
            data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
            await send({"type": "http.response.body", "body": data, "more_body": not last})
            if last:
                async for _ in self.body_iterator:  # lets the generator finish (its clean-up runs)
                    pass
                return
        if not started:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
