"""The transformers engine in a child process (what vLLM calls its engine core).

In one process the HTTP event loop and the decode loop share one interpreter lock, and on a small model
the decode loop is mostly Python: every token the event loop handles stalls the next step. Here the
child process owns the models and runs the same step loop (``server.scheduler.Scheduler``); the API
process keeps only the processor (requests are encoded there) and talks to the child over two pipes:

    API process                                     engine process (one thread)
    submit(row) ---- ("submit", id, row) ------->   taken between steps: Scheduler.submit
    cancel      ---- ("cancel", id) ------------>   Scheduler.cancel
    event loop  <--- ("events", [(id, event, started)], stats, errors) ---  after every step

``ProcessScheduler`` has the in-thread scheduler's interface (submit, cancel, num_running,
num_waiting, steps, on_step, on_failure), so the app does not know which one it drives.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import multiprocessing as mp
import os
import pickle
import select
import signal
import struct
import time
import traceback
from typing import Callable

from decoding.methods import REGISTRY, resolve
from decoding.request import Delta, EngineDead, Failed, Finished, SteeringSpec
from decoding.transformers_engine import encode_row, new_generator, row_for
from server.scheduler import QueueFull, Scheduler, Sink, Ticket


SMALL_BATCH = 4  # rows up to which the engine runs one intra-op thread (measured: no gain from two below 8)


class EngineFrontend:
    """What the API process needs of the engine without loading its models: the processor (to encode
    requests), which steering methods the engine runs, its context limit, and steering time per step."""

    name = "transformers"

    def __init__(self, model_path, methods: list[str], max_context: int, vocab_size: int,
                 image_methods: list[str] = (), unavailable: dict[str, str] | None = None):
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(str(model_path))
        self.tokenizer = self.processor.tokenizer
        self.methods = {m: REGISTRY[m] for m in methods}
        self.max_context = max_context
        self.vocab_size = vocab_size
        self.image_methods = set(image_methods)  # methods that read a request's decoded images (see ``_wire``)
        self.unavailable = dict(unavailable or {})  # registered methods this engine cannot run, and why
        self.steering_seconds: dict[str, float] = {}
        self.consultations: dict[str, tuple[int, int]] = {}  # method -> (consulted, skipped) row-steps

    @property
    def available_methods(self) -> list[str]:
        return ["none", *self.methods]

    def resolve(self, spec: SteeringSpec) -> dict[str, float]:
        return resolve(spec, self.methods, self.unavailable.get)

    def encode(self, request):
        return encode_row(self.processor, request, self.resolve(request.steering))

    def pop_steering_seconds(self) -> dict[str, float]:
        out, self.steering_seconds = self.steering_seconds, {}
        return out

    def pop_consultations(self) -> dict[str, tuple[int, int]]:
        out, self.consultations = self.consultations, {}
        return out

    row_for = staticmethod(row_for)


@dataclasses.dataclass(frozen=True)
class Withheld:
    """Stands for a request image that was not sent to the engine process (nothing there reads it); it
    is no image, so any code that tries to read its pixels fails loudly rather than see other pixels."""

    size: tuple[int, int]


def _portable(e: Exception) -> Exception:
    """The error itself when it survives pickling, else a RuntimeError that names it; either way with
    its traceback as text (``remote_traceback``: the API process logs it with the request id)."""
    text = "".join(traceback.format_exception(e))
    try:
        e.remote_traceback = text
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        out = RuntimeError(f"{type(e).__name__}: {e}")
        out.remote_traceback = text
        return out


def _send(conn, msg) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def _frame(msg) -> bytes:
    """``msg`` pickled, in ``Connection.send_bytes``'s framing (what ``recv_bytes`` reads)."""
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    head = struct.pack("!i", len(data)) if len(data) <= 0x7FFFFFFF else struct.pack("!iQ", -1, len(data))
    return head + data


class _CommandWriter:
    """The parent's commands to the engine, written without ever blocking the event loop. A blocking
    write waits for the engine to read its commands, while the engine, between two steps, may wait for
    the event loop to read its events: with both pipes full, neither moves (seen with 20 concurrent long
    requests: the server hung for good). Frames queue in the write transport's buffer instead and go
    out as the engine reads them; the event loop keeps reading events meanwhile."""

    def __init__(self, conn):
        self.conn = conn
        self.transport: asyncio.WriteTransport | None = None
        self.pending: list[bytes] = []  # frames sent before the transport is connected

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        pipe = open(os.dup(self.conn.fileno()), "wb", buffering=0)  # the transport closes its own copy
        self.transport, _ = await loop.connect_write_pipe(asyncio.Protocol, pipe)
        for frame in self.pending:
            self.transport.write(frame)
        self.pending.clear()

    def send(self, msg) -> None:
        if self.transport is None:
            self.pending.append(_frame(msg))
        elif self.transport.is_closing():
            raise OSError("the engine process's command pipe is closed")
        else:
            self.transport.write(_frame(msg))

    @property
    def buffered(self) -> int:
        """Bytes written but not yet taken by the engine process."""
        return sum(map(len, self.pending)) + (self.transport.get_write_buffer_size() if self.transport else 0)


class _Frames(asyncio.Protocol):
    """The engine's messages on the event loop: ``Connection.send_bytes`` frames (a big-endian 4-byte
    length, or -1 and an 8-byte one) cut out of the pipe's byte stream, however the reads split them."""

    def __init__(self, on_message: Callable[[bytes], None], on_close: Callable[[], None]):
        self.buf = bytearray()
        self.on_message, self.on_close = on_message, on_close

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 4:
            (n,) = struct.unpack("!i", self.buf[:4])
            head = 4
            if n == -1:
                if len(self.buf) < 12:
                    return
                (n,) = struct.unpack("!Q", self.buf[4:12])
                head = 12
            if len(self.buf) < head + n:
                return
            frame = bytes(self.buf[head : head + n])
            del self.buf[: head + n]
            self.on_message(frame)

    def connection_lost(self, exc) -> None:
        self.on_close()


def _engine_main(settings, commands, events) -> None:
    """The child: load the models, run the step loop, follow the parent's commands until told to stop
    (or until the parent goes away: the pipe closes)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains and then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from server.logs import configure

    configure(settings.log_level)  # a spawned process starts with no logging configuration
    try:
        from server.engines import load_engine

        engine = load_engine(settings)
    except Exception as e:
        _send(events, ("error", f"{type(e).__name__}: {e}"))
        return
    outbox: list = []
    failures: list = []

    import torch

    engine.prefill_threads = torch.get_num_threads()  # prefill on every core (a burst; compute-bound)
    threads = max(1, torch.get_num_threads() - 1)  # decode steps leave one core to the API process

    def fit_threads(rows: int) -> None:
        """One intra-op thread for small batches (on a small model more only wait at every op's barrier,
        and, spinning, take cores the API process needs); all but one core for large batches (the
        API process writes every row's tokens: on 2 cores, measured 675 against 581 tokens/s at 8
        concurrent streams with one thread rather than two)."""
        want = 1 if rows <= SMALL_BATCH else threads
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def flush(sched: Scheduler) -> None:
        fit_threads(sched.num_running)
        stats = {"steps": sched.steps, "steering_seconds": engine.pop_steering_seconds(),
                 "consultations": engine.pop_consultations()}
        done, outbox[:] = outbox[:], []
        errors, failures[:] = failures[:], []
        _send(events, ("events", done, stats, errors))

    tickets: dict[int, Ticket] = {}

    def sink_for(tid: int) -> Sink:
        def sink(ev) -> None:
            t = tickets.get(tid)
            if isinstance(ev, Failed):
                ev = Failed(_portable(ev.error))
            outbox.append((tid, ev, t.started if t else None))
            if isinstance(ev, (Finished, Failed)):
                tickets.pop(tid, None)
            if isinstance(ev, Failed):  # may happen outside a step (admission): no on_step follows
                flush(sched)
        return sink

    poller = select.poll()  # one poll object for the life of the loop (Connection.poll builds one per call)
    poller.register(commands.fileno(), select.POLLIN)

    def inbox(block: bool) -> None:
        """The parent's commands: all that are there, waiting for the first one when idle."""
        try:
            while poller.poll(None if block else 0):
                block = False
                msg = pickle.loads(commands.recv_bytes())
                if msg[0] == "submit":
                    _, tid, row = msg
                    try:
                        row.inputs = {k: torch.from_numpy(v) for k, v in row.inputs.items()}
                        row.generator = new_generator(row.request.sampling)
                        tickets[tid] = sched.submit(row, sink_for(tid))
                    except Exception as e:  # this row could not be taken: its request fails, alone
                        sink_for(tid)(Failed(e))
                elif msg[0] == "cancel":
                    t = tickets.pop(msg[1], None)
                    if t is not None:
                        sched.cancel(t)
                elif msg[0] == "stop":
                    sched.stop()
                    return
        except (EOFError, OSError):  # the parent is gone
            sched.stop()

    # One thread: the step loop takes the parent's commands between steps (no hand-over to a worker).
    sched = Scheduler(engine, settings.max_batch, max_queue=1 << 30, on_step=flush,
                      on_failure=lambda e: failures.append(_portable(e)), inbox=inbox, prefill_delay=settings.prefill_delay)
    _send(events, ("ready", {"methods": list(engine.methods), "max_context": engine.max_context,
                             "vocab_size": engine.vocab_size, "unavailable": engine.unavailable,
                             "image_methods": [n for n, m in engine.methods.items() if m.reads_images]}))
    fit_threads(0)
    try:
        sched.run()
    finally:
        events.close()


class ProcessScheduler:
    """The scheduler's interface over an engine process (see the module docstring)."""

    def __init__(self, settings, on_step: Callable | None = None, on_failure: Callable[[Exception], None] | None = None):
        self.settings = settings
        self.max_batch, self.max_queue = settings.max_batch, settings.max_queue
        self.on_step, self.on_failure = on_step, on_failure
        ctx = mp.get_context("spawn")  # two one-way pipes: commands (blocking writes) and events (read on the loop)
        commands, self._commands = ctx.Pipe(duplex=False)
        self._events, events = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_engine_main, args=(settings, commands, events), name="vlm-steer-engine", daemon=True)
        self._child_ends = (commands, events)
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count()
        self.engine: EngineFrontend | None = None
        self.steps = 0
        self.alive = False

    # ------------------------------------------------------------ life cycle

    def load(self) -> EngineFrontend:
        """Start the engine process and wait until its models are loaded (blocking)."""
        self._proc.start()
        for c in self._child_ends:
            c.close()
        try:
            msg = pickle.loads(self._events.recv_bytes())
        except EOFError:
            msg = ("error", f"the engine process exited with {self._proc.exitcode} while loading")
        if msg[0] != "ready":
            self._proc.join(timeout=10)
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        info = msg[1]
        self.engine = EngineFrontend(self.settings.model, info["methods"], info["max_context"], info["vocab_size"],
                                     info["image_methods"], info["unavailable"])
        self.alive = True
        return self.engine

    def start(self) -> None:
        """Read the engine's events on the running event loop (called from the server's lifespan).
        Everything else (submit, cancel, stop) runs on that loop too: no locks."""
        loop = asyncio.get_running_loop()
        pipe = open(os.dup(self._events.fileno()), "rb", buffering=0)  # the transport closes its own copy
        self._connecting = loop.create_task(loop.connect_read_pipe(  # events wait in the pipe meanwhile
            lambda: _Frames(lambda b: self._dispatch(pickle.loads(b)), self._engine_gone), pipe))
        self._writer = _CommandWriter(self._commands)
        self._connecting_writer = loop.create_task(self._writer.connect())

    def _command(self, msg) -> None:
        self._writer.send(msg)

    def kill(self) -> None:
        """End the engine process at once (a shutdown while it still loads: nothing to drain)."""
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    def stop(self) -> None:
        """Ask the engine process to stop, wait for it, kill it if it does not stop."""
        writer = getattr(self, "_writer", None)
        try:
            if writer is None:  # never started on an event loop
                _send(self._commands, ("stop",))
            else:
                writer.send(("stop",))  # with nothing queued before it, written at once
        except OSError:
            pass
        unsent = writer is not None and writer.buffered > 0  # cannot go out while this blocks: do not wait long
        self._proc.join(timeout=2 if unsent else 30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)

    # ------------------------------------------------------------ requests

    @property
    def num_waiting(self) -> int:
        return sum(t.started is None for t in list(self._tickets.values()))

    @property
    def num_running(self) -> int:
        return len(self._tickets) - self.num_waiting

    def submit(self, row, sink: Sink) -> Ticket:
        if self.num_waiting >= self.max_queue:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
        t = Ticket(row, sink)
        t.id = next(self._ids)
        self._tickets[t.id] = t
        if not self.alive:
            self._tickets.pop(t.id, None)
            sink(Failed(EngineDead("the engine process is not running")))
            return t
        self._command(("submit", t.id, self._wire(row)))
        return t

    def _wire(self, row):
        """The row as it crosses the pipe: the processor's tensors as numpy arrays (pickling a tensor goes
        through torch.save), and the request's decoded images only when one of its steering methods reads
        them (measured: pickling and sending one 4096x4096 image held the event loop 200-300 ms)."""
        wire = copy.copy(row)
        wire.inputs = {k: v.numpy() for k, v in row.inputs.items()}
        images = row.request.images
        if images and not set(row.steer) & self.engine.image_methods:
            wire.request = dataclasses.replace(row.request, images=[Withheld(im.size) for im in images])
        return wire

    def cancel(self, ticket: Ticket) -> None:
        ticket.cancelled = True
        if self._tickets.pop(getattr(ticket, "id", -1), None) is not None and self.alive:
            try:
                self._command(("cancel", ticket.id))
            except OSError:
                pass

    # ------------------------------------------------------------ events from the engine

    def _dispatch(self, msg) -> None:
        _, events, stats, errors = msg
        now = time.monotonic()
        for tid, ev, started in events:
            t = self._tickets.get(tid)
            if t is None or t.cancelled:
                continue
            if t.started is None:
                t.started = started or now
            if isinstance(ev, Delta) and t.first_token is None:
                t.first_token = now
            if isinstance(ev, (Finished, Failed)):
                self._tickets.pop(tid, None)
            t.sink(ev)
        for e in errors:
            if self.on_failure:
                self.on_failure(e)
        self.steps = stats["steps"]
        for method, sec in stats["steering_seconds"].items():
            self.engine.steering_seconds[method] = self.engine.steering_seconds.get(method, 0.0) + sec
        for method, (asked, skipped) in stats["consultations"].items():
            a, s = self.engine.consultations.get(method, (0, 0))
            self.engine.consultations[method] = (a + asked, s + skipped)
        if self.on_step:
            self.on_step(self)

    @property
    def death(self) -> str:
        """How the engine process ended, in words ("the engine process was killed by SIGKILL")."""
        self._proc.join(timeout=1)  # its pipe closed as it died: reaped at once (bounded, and only once it is gone)
        code = self._proc.exitcode
        if code is None:
            return "the engine process closed its pipe"
        if code < 0:
            try:
                return f"the engine process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"the engine process was killed by signal {-code}"
        return f"the engine process exited with status {code}"

    def _engine_gone(self) -> None:
        self.alive = False  # the engine process is gone: what was in flight fails, nothing new is admitted
        if self._tickets:
            error = EngineDead(self.death)
        for t in list(self._tickets.values()):
            self._tickets.pop(t.id, None)
            t.sink(Failed(error))
        if self.on_step:
            self.on_step(self)
