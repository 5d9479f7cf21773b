"""The control-plane HTTP/1.1 client: olb asking a backend something.

Probes, model polls, telemetry scrapes and the model-management fan-outs
(olb/manage.py) talk to backends through this one client. The data path
(proxied inference) does not: it relays bytes in olb/proxy.py.

Interface
---------
::

    client = BackendClient(host, port, *, connect_timeout=5.0, read_timeout=30.0,
                           max_head=MAX_HEAD, max_body=DEFAULT_MAX_BODY, max_idle=2)

    # Whole body in, whole body out.
    resp = await client.request(method, path, body=b"", headers=(),
                                timeout=None, max_body=None)
    resp.status: int; resp.headers: list[(lower-case bytes, bytes)]; resp.body: bytes
    resp.header(b"content-type") -> bytes | None; resp.json() -> object

    # Streamed response: chunks as they arrive (merged pull progress).
    async with client.stream(method, path, body=b"", headers=(), timeout=None) as resp:
        resp.status, resp.headers
        async for chunk in resp:      # bytes, de-framed, as read
            ...

    # Streamed request body: an async iterable of bytes with a known length,
    # written with backpressure (each chunk waits for the socket to drain).
    resp = await client.request("POST", path, body=aiter_of_bytes,
                                content_length=n)
    # (stream() takes body= and content_length= the same way.)

    await client.close()              # closes the idle keep-alive connections

`timeout` is the per-read idle timeout for that call (default read_timeout):
the longest olb waits for the next bytes of the response, or for the socket
to take the next chunk of a streamed body. It is not a deadline for the
whole exchange: a pull may stream progress for an hour. Wrap the call in
`asyncio.timeout` for a deadline.

Errors (olb/errors.py, so a caller can answer with `status_hint`):
BackendConnectError (refused, reset, closed before the response was whole;
also a connect that ran past connect_timeout), BackendTimeout (a read or a
drain ran past the idle timeout), BackendProtocolError (not HTTP/1.1, a head
over max_head, a body over max_body). A non-2xx status is not an error: the
caller reads it.

Theory of operation
-------------------
h11 frames both directions (`ResponseReader` holds the sans-IO part: bytes
in, head / body chunks / end out, with the body cap). The IO is asyncio
streams, which uvloop implements natively.

Keep-alive: a connection whose request and response both ended cleanly goes
back to a small idle list (`max_idle`); the next call takes the newest. A
backend may close an idle connection at any time (Go's http.Server closes
idle ones after IdleTimeout), so a request on a reused connection that fails
before any response byte is sent once more on a fresh connection -- but only
when its body is bytes (a streamed body cannot be replayed, so it always
gets a fresh connection). The Host header is the backend's own host:port,
because Ollama bound to loopback answers 403 to any other
(allowedHostsMiddleware in server/routes.go).
"""

from __future__ import annotations

import asyncio
import contextlib

import h11
import orjson

from .errors import BackendConnectError, BackendProtocolError, BackendTimeout, LocalResourceError
from .local import describe, is_local

#: Largest response head; h11's default (see olb/http.py MAX_HEAD for its precedents).
MAX_HEAD = 16 * 1024
#: Largest whole response body: an /api/tags of a few hundred models is ~100 KB,
#: a DCGM scrape of 8 GPUs ~60 KB; 16 MiB leaves room and still bounds memory.
DEFAULT_MAX_BODY = 16 * 1024 * 1024
#: Bytes asked of the socket per read.
READ_SIZE = 64 * 1024

_END = object()


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: ResponseReader.next_event(): feed more bytes first.
NEED_DATA = _NeedData()


class Response:
    """A whole response: status, headers (lower-case names), body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list, body: bytes = b""):
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self):
        """The body parsed as JSON (orjson.JSONDecodeError, a ValueError, if it is not)."""
        return orjson.loads(self.body)

    def __repr__(self) -> str:
        return f"Response({self.status}, {len(self.body)} bytes)"


class ResponseReader:
    """Sans-IO: one request/response cycle at a time on an h11 client connection.

    `request_head()` / `data()` / `end()` give the bytes to write; feed what
    the socket reads to `receive()` (b"" at EOF) and call `next_event()`
    until it returns NEED_DATA. Events: a Response (the head, empty body),
    bytes (a body chunk), or END (the response is complete).
    `start_next_cycle()` readies the connection for another request and
    returns False when it cannot be reused.
    """

    __slots__ = ("_conn", "_max_head", "_max_body", "_size", "_host")

    END = _END

    def __init__(self, host: bytes, max_head: int = MAX_HEAD, max_body: int = DEFAULT_MAX_BODY):
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=max_head)
        self._host = host
        self._max_head = max_head
        self._max_body = max_body
        self._size = 0

    def request_head(self, method: bytes, target: bytes, headers=(), content_length: int = 0,
                     max_body: int | None = None) -> bytes:
        self._size = 0
        if max_body is not None:
            self._max_body = max_body
        fields = [(b"host", self._host)]
        fields.extend(headers)
        fields.append((b"content-length", b"%d" % content_length))
        try:
            return self._conn.send(h11.Request(method=method, target=target, headers=fields))
        except h11.LocalProtocolError as exc:
            raise ValueError(f"cannot send {method!r} {target!r}: {exc}") from None

    def data(self, chunk: bytes) -> bytes:
        return self._conn.send(h11.Data(data=chunk))

    def end(self) -> bytes:
        return self._conn.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> None:
        self._conn.receive_data(data)

    def next_event(self):
        """The next thing the backend said.

        Returns:
            a Response (the head), bytes (a body chunk), END, or NEED_DATA.

        Raises:
            BackendProtocolError: not valid HTTP/1.1, a head over max_head,
                a body over max_body, or the connection closed mid-response.
        """
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BackendProtocolError(f"backend sent invalid HTTP: {exc}") from None
            cls = type(event)
            if cls is h11.Data:
                self._size += len(event.data)
                if self._size > self._max_body:
                    raise BackendProtocolError(f"backend response body over {self._max_body} bytes")
                return bytes(event.data)
            if cls is h11.Response:
                headers = [(n, v) for n, v in event.headers]
                # h11 caps only a head still incomplete in its buffer; one that
                # arrived whole in a single read is measured here.
                if sum(len(n) + len(v) + 4 for n, v in headers) > self._max_head:
                    raise BackendProtocolError(f"backend response head over {self._max_head} bytes")
                return Response(event.status_code, headers)
            if cls is h11.EndOfMessage:
                return _END
            if cls is h11.InformationalResponse:
                continue  # 100 Continue and the like: the real head follows
            if event is h11.NEED_DATA:
                return NEED_DATA
            if cls is h11.ConnectionClosed:
                raise BackendProtocolError("backend closed the connection mid-response")
            if event is h11.PAUSED:  # our request is not finished: a caller's bug
                raise RuntimeError("response read before the request was sent whole")

    @property
    def request_done(self) -> bool:
        # MUST_CLOSE: sent whole, and the response said Connection: close
        # (a body that ends with the connection, for one).
        return self._conn.our_state is h11.DONE or self._conn.our_state is h11.MUST_CLOSE

    def start_next_cycle(self) -> bool:
        conn = self._conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False


class _Conn:
    __slots__ = ("reader", "writer", "parser")

    def __init__(self, reader, writer, parser: ResponseReader):
        self.reader = reader
        self.writer = writer
        self.parser = parser

    def close(self) -> None:
        self.writer.close()


class StreamedResponse(Response):
    """A response whose body is read as it arrives: `async for chunk in resp`."""

    __slots__ = ("_client", "_conn", "_timeout", "done")

    def __init__(self, head: Response, client: "BackendClient", conn: _Conn, timeout: float):
        super().__init__(head.status, head.headers)
        self._client = client
        self._conn = conn
        self._timeout = timeout
        self.done = False

    async def __aiter__(self):
        while not self.done:
            event = await self._client._next_event(self._conn, self._timeout)
            if event is _END:
                self.done = True
                return
            if event:
                yield event


class BackendClient:
    """One backend's control-plane client, with its keep-alive connections."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 max_head: int = MAX_HEAD, max_body: int = DEFAULT_MAX_BODY, max_idle: int = 2):
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_head = max_head
        self.max_body = max_body
        self.max_idle = max_idle
        hostname = f"[{host}]" if ":" in host else host
        self._hostport = f"{hostname}:{port}".encode()
        self._idle: list[_Conn] = []
        self._closed = False

    async def request(self, method: str, path: str, body=b"", headers=(), timeout: float | None = None,
                      max_body: int | None = None, content_length: int | None = None) -> Response:
        """Send one request and read the whole response.

        Args:
            method, path: e.g. "GET", "/api/tags".
            body: bytes, or an async iterable of bytes (then content_length).
            headers: (name, value) pairs, bytes or str; Host and
                Content-Length are set here.
            timeout: per-read idle timeout, default read_timeout.
            max_body: cap on the response body, default max_body.

        Returns:
            Response(status, headers, body).

        Raises:
            BackendConnectError, BackendTimeout, BackendProtocolError.
        """
        timeout = self.read_timeout if timeout is None else timeout
        conn, head = await self._send(method, path, body, headers, timeout, max_body, content_length)
        try:
            chunks = []
            while True:
                event = await self._next_event(conn, timeout)
                if event is _END:
                    break
                chunks.append(event)
        except BaseException:
            conn.close()
            raise
        head.body = b"".join(chunks)
        self._release(conn)
        return head

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, body=b"", headers=(), timeout: float | None = None,
                     content_length: int | None = None, max_body: int | None = None):
        """Send one request; yield a StreamedResponse whose body is read as it arrives.

        The body cap (max_body) applies to the streamed body too. Leaving the
        block before the body ended closes the connection (a pull stops when
        its connection closes, like any Ollama request).
        """
        timeout = self.read_timeout if timeout is None else timeout
        conn, head = await self._send(method, path, body, headers, timeout, max_body, content_length)
        resp = StreamedResponse(head, self, conn, timeout)
        try:
            yield resp
        except BaseException:
            conn.close()
            raise
        if resp.done:
            self._release(conn)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def _send(self, method, path, body, headers, timeout, max_body, content_length):
        streamed = not isinstance(body, (bytes, bytearray, memoryview))
        if streamed and content_length is None:
            raise ValueError("a streamed body needs content_length")
        head_fields = [(_b(n), _b(v)) for n, v in headers]
        for attempt in (0, 1):
            conn = None if streamed else self._take()
            reused = conn is not None
            if conn is None:
                conn = await self._open()
            try:
                parser = conn.parser
                length = content_length if streamed else len(body)
                max_b = self.max_body if max_body is None else max_body
                head = parser.request_head(_b(method), _b(path), head_fields, length, max_b)
                if streamed:
                    conn.writer.write(head)
                    await self._drain(conn, timeout)
                    sent = 0
                    async for chunk in body:
                        if not chunk:
                            continue
                        sent += len(chunk)
                        if sent > length:
                            raise ValueError(f"streamed body is longer than content_length {length}")
                        conn.writer.write(parser.data(chunk))
                        await self._drain(conn, timeout)
                    if sent != length:
                        raise ValueError(f"streamed body ended at {sent} of content_length {length}")
                    conn.writer.write(parser.end())
                else:
                    out = [head]
                    if body:
                        out.append(parser.data(bytes(body)))
                    out.append(parser.end())
                    conn.writer.write(b"".join(out))
                await self._drain(conn, timeout)
                event = await self._next_event(conn, timeout)
            except BackendConnectError:
                conn.close()
                if reused and attempt == 0:
                    continue  # the backend closed an idle connection: once more, fresh
                raise
            except BaseException:
                conn.close()
                raise
            if not isinstance(event, Response):  # pragma: no cover - h11 gives the head first
                conn.close()
                raise BackendProtocolError("backend sent a body before its head")
            return conn, event
        raise AssertionError("unreachable")

    async def _open(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=READ_SIZE)
        except TimeoutError:
            raise BackendConnectError(f"connect to {self._hostport.decode()} timed out "
                                      f"after {self.connect_timeout:g} s") from None
        except OSError as exc:
            if is_local(exc):
                raise LocalResourceError(describe(exc)) from exc
            raise BackendConnectError(f"connect to {self._hostport.decode()}: {exc}") from None
        return _Conn(reader, writer, ResponseReader(self._hostport, self.max_head, self.max_body))

    async def _drain(self, conn: _Conn, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await conn.writer.drain()
        except TimeoutError:
            raise BackendTimeout(f"{self._hostport.decode()} took no data for {timeout:g} s") from None
        except OSError as exc:
            raise BackendConnectError(f"{self._hostport.decode()}: {exc}") from None

    async def _next_event(self, conn: _Conn, timeout: float):
        parser = conn.parser
        while True:
            event = parser.next_event()
            if event is not NEED_DATA:
                return event
            try:
                async with asyncio.timeout(timeout):
                    data = await conn.reader.read(READ_SIZE)
            except TimeoutError:
                raise BackendTimeout(f"{self._hostport.decode()} sent nothing for {timeout:g} s") from None
            except OSError as exc:
                raise BackendConnectError(f"{self._hostport.decode()}: {exc}") from None
            if not data and not parser.request_done:
                raise BackendConnectError(f"{self._hostport.decode()} closed the connection")
            try:
                parser.receive(data)
            except h11.RemoteProtocolError as exc:  # data after EOF and the like
                raise BackendProtocolError(f"backend sent invalid HTTP: {exc}") from None
            if not data:
                try:
                    event = parser.next_event()
                except BackendProtocolError:
                    raise BackendConnectError(f"{self._hostport.decode()} closed the connection "
                                              "before the response was whole") from None
                if event is NEED_DATA:
                    raise BackendConnectError(f"{self._hostport.decode()} closed the connection")
                return event

    def _take(self) -> _Conn | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Conn) -> None:
        if (not self._closed and len(self._idle) < self.max_idle and conn.parser.start_next_cycle()
                and not conn.reader.at_eof()):
            self._idle.append(conn)
        else:
            conn.close()


def _b(value) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("latin-1")
