"""The IO shell: an asyncio.Protocol per connection, HTTP/1.1 via h11.

Rules for this module: bytes in, bytes out, connection lifecycle, flow
control and the host check; what a request *means* is api.py's business.

Theory of operation, one connection:

    idle --Request..EndOfMessage--> in response --respond / stream_end--> idle
      ^                               |   (crash: transport.abort())
      +----- start_next_cycle <-------+
                                      +--peer closes--> aborted: job.cancel(),
                                                        stats.aborted, abort_event

* Pipelining: h11 hands out one request at a time (PAUSED until
  start_next_cycle), so pipelined requests are answered strictly in order.
  While a response is in progress, bytes that arrive are fed to h11 and left
  there; past PIPELINE_BUFFER_MAX of them we stop reading, so a client cannot
  grow our memory by pipelining -- but we keep reading below that, because a
  paused reader would not notice the peer going away mid-stream.
* Write flow control: the transport calls pause_writing above the high-water
  mark; the job (engine.Generation) sees `writable` False after its next
  token and stops; resume_writing resumes it.  A finished response is not
  followed by the next pipelined one until the transport drains.
* Framing like Go's net/http: streamed bodies are chunked, one HTTP chunk per
  stream_write (each written at once, TCP_NODELAY, like Go's Flush per line);
  complete bodies carry Content-Length.  The chunk framing is done here rather
  than through h11.Data: h11 only needs the Response and EndOfMessage events to
  keep its state, and skipping Data saves work per token.
* Peer gone (connection_lost, or EOF -- Go's server cancels the request
  context on either) while a response is in progress: the job is cancelled,
  its slot or queue place freed, and the abort is recorded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate

import h11

from olb.sim.api import Api, Request
from olb.sim.catalogue import Catalogue, parse_name
from olb.sim.clock import Clock
from olb.sim.config import SimConfig
from olb.sim.engine import Engine

# Transport write buffer watermarks (bytes).  64 KiB high like asyncio's
# default; low = high // 4 as uvloop's flowcontrol helper does.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = WRITE_HIGH_WATER // 4
# Bytes a client may pipeline ahead while a response is in progress.
PIPELINE_BUFFER_MAX = 256 * 1024
# h11's default limit on a request head (16 KiB, precedent in h11's docs).
MAX_HEAD = 16 * 1024
# Distinct paths counted in SimStats.by_path; the rest share "<other>".
MAX_PATHS = 1024

_REASONS = {200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request",
            403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
            413: b"Request Entity Too Large", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 503: b"Service Unavailable"}


@dataclass(slots=True)
class SimStats:
    """Counters of one instance (plain ints; read them from the loop's thread)."""

    requests: int = 0            # requests received (dispatched to a handler)
    by_path: dict = field(default_factory=dict)
    active: int = 0              # requests whose response is not complete yet
    max_active: int = 0
    connections_open: int = 0
    connections_total: int = 0
    aborted: int = 0             # responses cut short because the peer closed
    rejected: int = 0            # 503 "server busy" (queue full)
    faults: int = 0              # connections dropped by fail_after_tokens


def _response(status: int, headers: list) -> h11.Response:
    # _parsed=True skips h11's per-header regex validation (a third of the
    # cost of a small response): every header here is built by this module
    # from constants, digits and the content types in api.py.
    return h11.Response(status_code=status, headers=headers, reason=_REASONS.get(status, b""),
                        http_version=b"1.1", _parsed=True)


class _DateHeader:
    """RFC 7231 Date, formatted once per second."""

    __slots__ = ("_sec", "_value")

    def __init__(self):
        self._sec = -1
        self._value = b""

    def get(self) -> bytes:
        sec = int(time.time())
        if sec != self._sec:
            self._sec = sec
            self._value = formatdate(sec, usegmt=True).encode()
        return self._value


def _go_is_private(ip) -> bool:
    """netip.Addr.IsPrivate: RFC 1918 and RFC 4193 only."""
    if ip.version == 4:
        return any(ip in n for n in _PRIVATE4)
    return ip in _PRIVATE6


_PRIVATE4 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_PRIVATE6 = ipaddress.ip_network("fc00::/7")
_LOCAL_TLDS = (".localhost", ".local", ".internal")


def allowed_host(host_header: str, hostname: str) -> bool:
    """Ollama's allowedHostsMiddleware for a loopback bind (server/routes.go, allowedHost):
    loopback/private/unspecified IPs, localhost, the machine's hostname and
    *.localhost|*.local|*.internal pass.  (Ollama also accepts the IPs of
    local interfaces; the simulator does not enumerate them.)"""
    host = host_header
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end > 0 else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip.is_loopback or ip.is_unspecified or _go_is_private(ip)
    host = host.lower()
    if host in ("", "localhost") or host == hostname.lower():
        return True
    return host.endswith(_LOCAL_TLDS)


class SimProtocol(asyncio.Protocol):
    """One client connection (and the api's ResponseWriter for it)."""

    __slots__ = ("server", "transport", "conn", "job", "done", "writable", "_req", "_body", "_upload",
                 "_in_response", "_chunked", "_head_only", "_pipelined", "_read_paused",
                 "_closed", "_by_us", "_fragment", "_write", "_loop", "_started")

    def __init__(self, server: "SimServer"):
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it first
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.job = None
        self.done = True            # no response in progress
        self.writable = True
        self._req = None
        self._body: list[bytes] = []
        self._upload = None
        self._in_response = False
        self._chunked = True
        self._head_only = False
        self._started = False
        self._pipelined = 0
        self._read_paused = False
        self._closed = False
        self._by_us = False
        self._fragment = server.config.fragment
        self._loop = server.loop

    # --- asyncio callbacks ------------------------------------------------------

    def connection_made(self, transport):
        """Called by the loop when a client connects."""
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                # Go's net/http sets TCP_NODELAY: every flushed line leaves at once.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        self._write = transport.write if not self._fragment else self._write_fragmented
        stats = self.server.stats
        stats.connections_open += 1
        stats.connections_total += 1
        self.server._connections.add(self)

    def data_received(self, data):
        """Called by the transport with bytes from the client."""
        self.conn.receive_data(data)
        if self._in_response:
            self._pipelined += len(data)
            if self._pipelined > PIPELINE_BUFFER_MAX and not self._read_paused:
                self._read_paused = True
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self):
        """Called by the transport when the client half-closes."""
        if self._in_response:
            self._peer_gone()
            return False
        # Requests that arrived complete before the EOF still get answers
        # (a `printf ... | nc` client); one that would have to wait for a
        # slot is cancelled, as Go cancels the request context on EOF.
        self.conn.receive_data(b"")
        self._process()
        if self._in_response:
            self._peer_gone()
        return not self._closed

    def connection_lost(self, exc):
        """Called by the transport when the connection is closed."""
        self._closed = True
        self.server._connections.discard(self)
        self.server.stats.connections_open -= 1
        if self._in_response:
            if self._by_us:
                self._end_response()
            else:
                self._peer_gone()

    def pause_writing(self):
        """Called by the transport when its buffer passes the high-water mark."""
        self.writable = False

    def resume_writing(self):
        """Called by the transport when its buffer drains below the low-water mark."""
        self.writable = True
        if self.job is not None:
            resume = getattr(self.job, "resume", None)
            if resume is not None:
                resume()
        elif not self._in_response and not self._closed:
            self._process()

    # --- request side -------------------------------------------------------------

    def _process(self):
        conn = self.conn
        while not self._in_response and not self._closed:
            if not self.writable:
                return  # resume_writing picks up the next request
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._bad_request(exc)
                return
            if event is h11.NEED_DATA:
                if self._read_paused:
                    self._read_paused = False
                    self.transport.resume_reading()
                return
            if event is h11.PAUSED:
                return
            kind = type(event)
            if kind is h11.Request:
                self._req = event
                self._body = []
                # A blob upload is hashed as it arrives, never held whole
                # (GGUF blobs are gigabytes).
                self._upload = self.server.api.body_consumer(event.method, event.target)
                if conn.client_is_waiting_for_100_continue:
                    # Go's server sends 100 Continue when the handler reads
                    # the body; every handler here reads it.
                    self._write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
            elif kind is h11.Data:
                if self._upload is not None:
                    self._upload.feed(event.data)
                else:
                    self._body.append(event.data)
            elif kind is h11.EndOfMessage:
                self._dispatch()
            elif kind is h11.ConnectionClosed:
                self._close()
                return

    def _dispatch(self):
        ev = self._req
        self._req = None
        body = b"".join(self._body) if len(self._body) != 1 else self._body[0]
        self._body = []
        server = self.server
        stats = server.stats
        target = ev.target
        q = target.find(b"?")
        path = (target if q < 0 else target[:q]).decode("latin-1")
        method = ev.method.decode("latin-1")
        stats.requests += 1
        by_path = stats.by_path
        if path not in by_path and len(by_path) >= MAX_PATHS:
            path_key = "<other>"   # a fuzzing client must not grow this without bound
        else:
            path_key = path
        by_path[path_key] = by_path.get(path_key, 0) + 1
        stats.active += 1
        if stats.active > stats.max_active:
            stats.max_active = stats.active
        self._in_response = True
        self.done = False
        self._started = False
        self._pipelined = 0
        self._head_only = method == "HEAD"
        self._chunked = self.conn.their_http_version != b"1.0"
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in ev.headers}
        if server.check_hosts and not server.host_allowed(headers.get("host", "")):
            # Ollama answers a foreign Host with a bare 403 (routes.go allowedHostsMiddleware).
            self.respond(403, None, b"")
            return
        if server.check_hosts and method == "OPTIONS":
            self.respond(204, None, b"")
            return
        req = Request(method, path, headers, body, time.perf_counter(), self._upload)
        self._upload = None
        try:
            server.api.handle(req, self)
        except Exception:
            # A handler bug must not wedge the connection: answer like gin's
            # recovery middleware, then let the loop's handler report it.
            if not self.done and not self._started:
                self.respond(500, None, b"")
            raise

    def _bad_request(self, exc):
        """Malformed HTTP: answer with h11's status hint and close (Go does too)."""
        status = getattr(exc, "error_status_hint", 400)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            reason = _REASONS.get(status, b"Bad Request")
            body = str(status).encode() + b" " + reason
            self._write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (status, reason, len(body), body))
        self._close()

    # --- ResponseWriter (see api.py) -------------------------------------------------

    def _headers(self, content_type, extra):
        h = []
        if content_type:
            h.append((b"Content-Type", content_type.encode()))
        h.append((b"Date", self.server.date.get()))
        h.extend(extra)
        return h

    def respond(self, status: int, content_type, body: bytes) -> None:
        """A complete response with Content-Length."""
        if self.done or self._closed:
            return
        conn = self.conn
        headers = self._headers(content_type, ((b"Content-Length", b"%d" % len(body)),))
        out = conn.send(_response(status, headers))
        if body and not self._head_only and status not in (204, 304):
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        self._write(out)
        self._end_response()

    def stream_start(self, status: int, content_type) -> None:
        """The head of a chunked response (sent with the first line)."""
        if self.done or self._closed:
            return
        self._started = True
        headers = self._headers(content_type, ((b"Transfer-Encoding", b"chunked"),))
        self._write(self.conn.send(_response(status, headers)))

    def stream_write(self, data: bytes) -> None:
        """One chunk, handed to the transport at once."""
        if self._closed or self._head_only:
            return
        if self._chunked:
            self._write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self._write(data)

    def stream_end(self) -> None:
        if self.done or self._closed:
            return
        self._write(self.conn.send(h11.EndOfMessage()))
        self._end_response()

    def crash(self) -> None:
        """fail_after_tokens: the backend dies -- no final chunk, connection gone."""
        if self._closed:
            return
        self._by_us = True
        self._closed = True
        self.transport.abort()

    def _write_fragmented(self, data: bytes) -> None:
        n = self._fragment
        write = self.transport.write
        for i in range(0, len(data), n):
            write(data[i:i + n])

    # --- lifecycle ------------------------------------------------------------------

    def _end_response(self):
        self.done = True
        self.job = None
        if not self._in_response:
            return
        self._in_response = False
        self.server.stats.active -= 1
        if self._closed:
            return
        conn = self.conn
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            self._close()
            return
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            # Pipelined requests already buffered: answer the next one now (or
            # once the transport drains), then read more.
            self._loop.call_soon(self._process)
        elif conn.their_state is not h11.DONE:
            # We answered before reading the whole request (errors only).
            self._close()

    def _peer_gone(self):
        job = self.job
        self.job = None
        if job is not None:
            job.cancel()
        self.done = True
        if self._in_response:
            self._in_response = False
            server = self.server
            server.stats.active -= 1
            server.stats.aborted += 1
            server.aborts.append(self._loop.time())
            server.abort_event.set()
        self._close()

    def _close(self):
        if not self._closed:
            self._closed = True
            self.transport.close()

    def shutdown(self):
        """SimServer.close(): drop the connection; not the peer's doing."""
        job = self.job
        self.job = None
        if job is not None:
            job.cancel()
        if self._in_response:
            self._in_response = False
            self.done = True
            self.server.stats.active -= 1
        self._by_us = True
        if not self._closed:
            self._closed = True
            self.transport.abort()


class SimServer:
    """One listening simulated Ollama instance."""

    def __init__(self, config: SimConfig, loop, host: str, sock: socket.socket):
        self.config = config
        self.loop = loop
        self.stats = SimStats()
        self.abort_event = asyncio.Event()
        self.aborts: list = []
        self.clock = Clock(frozen=config.deterministic_time)
        self.catalogue = Catalogue.from_models(config.models, self.clock.now())
        self.engine = Engine(config, loop, self.clock.now)
        self.engine.preload(self._preload_entries(config))
        self.api = Api(config, self.catalogue, self.engine, self.clock, self.stats, loop)
        self.date = _DateHeader()
        self.hostname = socket.gethostname()
        self._connections: set = set()
        self._hosts_seen: dict = {}
        self._server = None
        self.sock = sock
        addr = sock.getsockname()
        self.host = addr[0]
        self.port: int = addr[1]
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        try:
            loopback = ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            loopback = False
        self.check_hosts = config.host_check and loopback
        # dcgm-exporter labels: a UUID stable per address, this host's name.
        self.api.gpu_uuid = "GPU-" + str(uuid.uuid5(uuid.NAMESPACE_URL, self.url))
        self.api.hostname = self.hostname

    def _preload_entries(self, config: SimConfig) -> list:
        entries = []
        for m in config.preload:
            name = parse_name(m if isinstance(m, str) else m.name)
            entry = self.catalogue.lookup(name) if name is not None else None
            if entry is None:
                raise ValueError(f"preload model {m!r} is not among the installed models")
            entries.append(entry)
        return entries

    def host_allowed(self, host: str) -> bool:
        ok = self._hosts_seen.get(host)
        if ok is None:
            ok = allowed_host(host, self.hostname)
            if len(self._hosts_seen) < 1024:
                self._hosts_seen[host] = ok
        return ok

    async def _start(self):
        self._server = await self.loop.create_server(lambda: SimProtocol(self), sock=self.sock, backlog=1024)

    async def close(self) -> None:
        """Stop listening and drop every connection (idempotent)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for proto in list(self._connections):
            proto.shutdown()
        self.engine.close()
        await server.wait_closed()

    def __repr__(self):
        return f"<SimServer {self.url}>"


def _listen(host: str, port: int) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_sim(config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                    sock: socket.socket | None = None) -> SimServer:
    """Start one simulated Ollama on the running loop.

    Args:
        config: the knobs (SimConfig() if None).
        host, port: where to listen; port 0 picks a free port (read it back
            from `.port`).  Ignored when `sock` is given.
        sock: an already bound, listening socket to serve on.
    Returns:
        The running SimServer; `await server.close()` stops it.
    """
    loop = asyncio.get_running_loop()
    own = sock is None
    if own:
        sock = _listen(host, port)
    assert sock is not None
    try:
        server = SimServer(config or SimConfig(), loop, host, sock)
    except BaseException:
        if own:
            sock.close()
        raise
    await server._start()
    return server


async def start_cluster(count: int, config: SimConfig | None = None, host: str = "127.0.0.1",
                        base_port: int = 0) -> list:
    """Start `count` instances on consecutive ports from `base_port` (0: each
    gets its own ephemeral port).  All or nothing: a failed bind closes the
    ones already started and re-raises."""
    servers = []
    try:
        for i in range(count):
            servers.append(await start_sim(config, host, base_port + i if base_port else 0))
    except BaseException:
        for s in servers:
            await s.close()
        raise
    return servers
