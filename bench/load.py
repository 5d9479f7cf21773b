"""The load generator: keep-alive HTTP/1.1 connections driven from callbacks.

One `asyncio.Protocol` per connection; the next request is written from
`data_received`, with no coroutine per request, because the generator shares
the cores with the proxy and the backends (about 35 µs of CPU per small
request, 5-10 µs per streamed line, on uvloop).  It parses just enough HTTP
to find where a response ends (Content-Length or chunked) and counts the
NDJSON lines of chunked bodies.

A `Phase` is one batch of requests spread over connections, bounded in
count (`remaining`) and in time (`deadline`): a connection stops issuing
requests when either runs out, and the phase is done when every connection
has gone idle.  Per request it records, when `phase.recording` was true as
the request was written:

    latencies  seconds to the end of the response
    ttfb       seconds to the response head
    ttft       seconds to the first complete NDJSON line (streams only)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time

MODEL = "llama3.2"
#: Extra seconds a phase may take past its deadline to finish requests in flight.
GRACE = 10.0

HEAD, BODY, CSIZE, CDATA, CCRLF, TRAILER = range(6)


class Phase:
    """One batch of requests spread over keep-alive connections; bounded in count and time."""

    def __init__(self, loop, request: bytes | list[bytes], count: int, seconds: float, conns: int):
        self.loop = loop
        # One request for every connection, or one per connection (each names its own Host).
        self.request = request
        self.remaining = count
        self.seconds = seconds
        self.deadline = 0.0
        self.recording = True
        self.latencies: list[float] = []
        self.ttfb: list[float] = []
        self.ttft: list[float] = []
        self.lines_per_response: dict[int, int] = {}
        self.lines = 0          # NDJSON lines received so far, live
        self.open = 0           # requests written and not yet answered in full
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.active = conns
        self.done = loop.create_future()
        self.started = 0.0
        self.elapsed = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def stop_issuing(self) -> None:
        """Connections finish the request they are on and then go idle."""
        self.deadline = 0.0

    def conn_idle(self) -> None:
        self.active -= 1
        if self.active == 0 and not self.done.done():
            self.elapsed = time.perf_counter() - self.started
            self.done.set_result(None)


class ClientConn(asyncio.Protocol):
    """One keep-alive connection: a request, its response, the next request -- from callbacks."""

    __slots__ = ("transport", "phase", "request", "state", "left", "buf", "t0", "lines", "status",
                 "connected", "closed", "rec", "first_line")

    def __init__(self, loop):
        self.transport = None
        self.phase: Phase | None = None
        self.request = b""
        self.state = HEAD
        self.left = 0
        self.buf = b""
        self.t0 = 0.0
        self.lines = 0
        self.status = 0
        self.connected = loop.create_future()
        self.closed = False
        self.rec = False
        self.first_line = False

    def connection_made(self, transport):
        self.transport = transport
        self.connected.set_result(None)

    def connection_lost(self, exc):
        self.closed = True
        phase = self.phase
        if phase is not None:
            self.phase = None
            phase.error("connection lost" if exc is None else f"connection lost: {exc!r}")
            phase.open -= 1
            phase.conn_idle()

    def start(self, phase: Phase, request: bytes) -> None:
        self.phase = phase
        self.request = request
        if self.closed:
            self.phase = None
            phase.error("connection closed before the phase")
            phase.conn_idle()
            return
        self._next()

    def _next(self) -> None:
        phase = self.phase
        if phase.remaining <= 0 or time.perf_counter() > phase.deadline:
            self.phase = None
            phase.conn_idle()
            return
        phase.remaining -= 1
        phase.open += 1
        self.state = HEAD
        self.lines = 0
        self.first_line = False
        self.rec = phase.recording
        self.t0 = time.perf_counter()
        self.transport.write(self.request)

    def _finish(self) -> None:
        phase = self.phase
        phase.open -= 1
        phase.completed += 1
        if self.rec:
            phase.latencies.append(time.perf_counter() - self.t0)
        if self.status != 200:
            phase.error(f"status {self.status}")
        counts = phase.lines_per_response
        counts[self.lines] = counts.get(self.lines, 0) + 1
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.phase is None:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == CDATA or state == BODY:
                take = n - pos
                if take > self.left:
                    take = self.left
                if state == CDATA:
                    got = data.count(b"\n", pos, pos + take)
                    if got:
                        if not self.first_line:
                            self.first_line = True
                            if self.rec:
                                self.phase.ttft.append(time.perf_counter() - self.t0)
                        self.lines += got
                        self.phase.lines += got
                pos += take
                self.left -= take
                if self.left == 0:
                    if state == CDATA:
                        self.state = CCRLF
                    else:
                        self._finish()
            elif state == CCRLF:
                if n - pos < 2:
                    break
                pos += 2
                self.state = CSIZE
            elif state == CSIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(data[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size:
                    self.left = size
                    self.state = CDATA
                else:
                    self.state = TRAILER
            elif state == TRAILER:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                empty = end == pos  # an empty line ends the (usually absent) trailer section
                pos = end + 2
                if empty:
                    self._finish()
                    if self.phase is None:
                        return
            else:  # HEAD
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = data[pos:end].lower()
                pos = end + 4
                self.status = int(head[9:12])
                if self.rec:
                    self.phase.ttfb.append(time.perf_counter() - self.t0)
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.left = int(head[i + 17:j if j >= 0 else len(head)])
                    self.state = BODY
                    if self.left == 0:
                        self._finish()
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.state = CSIZE
                else:
                    self.phase.error("response without a length")
                    self.transport.abort()
                    return
                if self.phase is None:
                    return
        if pos < n:
            self.buf = data[pos:]


async def open_conns(loop, addresses: list[tuple[str, int]], count: int) -> list[ClientConn]:
    """`count` connections, spread round-robin over `addresses` (connection i goes to i % len)."""
    conns = []
    for i in range(count):
        conn = ClientConn(loop)
        host, port = addresses[i % len(addresses)]
        await loop.create_connection(lambda c=conn: c, host, port)
        await conn.connected
        conns.append(conn)
    return conns


def close_conns(conns: list[ClientConn]) -> None:
    for conn in conns:
        if conn.transport is not None:
            conn.transport.close()


async def run_phase(loop, conns: list[ClientConn], requests: list[bytes], count: int, seconds: float,
                    stagger: float = 0.0, recording: bool = True, on_start=None) -> Phase:
    """Run one phase: `requests[i]` on `conns[i]`; connection i starts at i * stagger / len(conns) s.

    `on_start(phase)`, if given, is awaited alongside (it may flip `recording` or stop the phase).
    """
    with _no_collector_pauses():
        return await _run_phase(loop, conns, requests, count, seconds, stagger, recording, on_start)


@contextlib.contextmanager
def _no_collector_pauses():
    # A full collection of this process's heap took 10-20 ms mid-phase (measured
    # with gc.callbacks at 1,000 paced streams): the generator's own pause then
    # shows as every target's TTFT tail.  A phase is bounded in time and its
    # callbacks make little cyclic garbage, so the collector waits for its end.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def _run_phase(loop, conns, requests, count, seconds, stagger, recording, on_start) -> Phase:
    phase = Phase(loop, requests, count, seconds, len(conns))
    phase.recording = recording
    phase.started = time.perf_counter()
    phase.deadline = phase.started + seconds
    step = stagger / len(conns) if conns else 0.0
    for i, conn in enumerate(conns):
        if step:
            loop.call_later(i * step, conn.start, phase, requests[i])
        else:
            conn.start(phase, requests[i])
    side = asyncio.ensure_future(on_start(phase)) if on_start else None
    try:
        await asyncio.wait_for(asyncio.shield(phase.done), seconds + stagger + GRACE)
    except asyncio.TimeoutError:
        phase.error("phase did not finish: responses stuck in flight")
        for conn in conns:
            if conn.phase is not None:
                conn.transport.abort()
        phase.elapsed = time.perf_counter() - phase.started
    finally:
        if side is not None:
            if not side.done():
                side.cancel()
            try:
                await side
            except asyncio.CancelledError:
                pass
    return phase


# --- requests ------------------------------------------------------------------------------------


def build_request(case: str, hostport: str, num_predict: int = 16, tokens: int = 2000) -> bytes:
    """The raw request of a case: `version` (GET), `generate` (stream:false), or a stream."""
    if case == "version":
        return (f"GET /api/version HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: olb-bench\r\n"
                f"Accept: */*\r\n\r\n").encode()
    if case == "generate":
        body = {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False,
                "options": {"num_predict": num_predict}}
    else:
        body = {"model": MODEL, "prompt": "Tell me a long story.", "options": {"num_predict": tokens}}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST /api/generate HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: olb-bench\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET with Connection: close; (status, body), chunked bodies decoded."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"not an HTTP response: {raw[:80]!r}")
    if b"transfer-encoding: chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return int(head[9:12]), body


async def http_get_json(host: str, port: int, path: str) -> dict:
    _status, body = await http_get(host, port, path)
    return json.loads(body)


def sum_errors(*phases) -> dict[str, int]:
    """The error counts of several phases (run_phase results), summed."""
    errors: dict[str, int] = {}
    for phase in phases:
        for key, n in phase.errors.items():
            errors[key] = errors.get(key, 0) + n
    return errors


def merge_counts(rounds: list[dict]) -> tuple[dict[str, int], dict[int, int]]:
    """The error counts and lines-per-response histogram of several rounds, summed."""
    errors: dict[str, int] = {}
    lines: dict[int, int] = {}
    for r in rounds:
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
        for key, n in r["lines_per_response"].items():
            lines[key] = lines.get(key, 0) + n
    return errors, lines


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile of an already sorted list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]
