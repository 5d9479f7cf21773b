# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""The IO shell: asyncio Protocols that move bytes between clients and backends.

Rules for this module: Protocol classes and the Exchange that glues one
client request to one backend attempt at a time. No HTTP parsing here (that
is http.py), no selection (routing.py / balancer.py / _core), no pause/resume outside
flow.py's ReadGate.

Where a request goes
--------------------
    ClientSideProtocol.data_received      h11 parses the request (http.RequestReader)
      -> Exchange.start                   the balancer's Router decides (olb/routing.py): a backend
                                          picked and counted by _core, the queue, or an error
      -> Exchange.admit                   a pooled keep-alive connection, or a new one
      -> BackendSideProtocol.attach       request head + body written upstream
      -> BackendSideProtocol.data_received
           head: http.parse_response_head -> Exchange.on_head -> client
           body: _relay.Relay (compiled): the bytes go to the client as read, and
                 _http.BodyScanner finds the end
      -> Exchange.on_end                  release, park the connection, next request

Exchange states (one request's life; each arrow is the only way in):

    QUEUED ----admit----> CONNECTING --connected--> WAITING --first byte--> STREAMING --end--> DONE
      |  ^                    |                        |                       |
      |  +------retry---------+------------------------+  (before the first    |
      |     (same request, another backend, bounded    |   byte only)          |
      |      by OLB_RETRIES)                           |                       |
      +--expired / full--> error response            timeout -> probe    backend lost -> error
                                                     (504, or wait on if  line (chunked) or close
                                                      not streamed and the
                                                      backend answers it)

A request that runs no model (models.takes_slot: /, /api/version, /api/show,
...) skips QUEUED: Balancer.pick gives it a healthy backend without counting
a slot, so it never waits behind inference.

Invariants: the backend index is acquired at admit and released exactly
once (_release clears it; an exchange without a slot holds an index but
nothing counted, and releases nothing); a client that goes away aborts the backend
connection at once, because closing that socket is what makes Ollama stop
generating; after the first response byte there is no retry (a chat stream
is continued on another backend instead: Exchange._resume, olb/resume.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import orjson

from . import admin, local, resume, routing
from ._core import NO_BACKEND
from ._relay import Relay, monotonic
from .admin import is_admin_path
from .auth import refusal_response
from .errors import (
    BackendConnectError,
    BackendProtocolError,
    BackendTimeout,
    LocalResourceError,
    NoBackendAvailable,
    NotFound,
    OlbError,
    TooManyRequests,
)
from .fairqueue import OVER_SHARE
from .fairqueue import QUEUED as QUEUED_OK
from .flow import BODY as BODY_HELD
from .flow import PEER_SLOW, PIPELINE, ReadGate, TimedReadGate, set_write_limits
from .hostcheck import FORBIDDEN, FORBIDDEN_CLOSE

if TYPE_CHECKING:  # (compiled, proxy.pxd cimports ResponseHead: this name must differ)
    from .http import ResponseHead as Head
from .http import (
    BODY,
    CHUNKED,
    CLOSED,
    HEAD,
    LENGTH,
    NEED_DATA,
    NO_BODY,
    UNTIL_CLOSE,
    ProxyRequest,
    RequestReader,
    downstream_head,
    error_body,
    error_response,
    parse_response_head,
    simple_response,
    stream_error_tail,
    upstream_head_parts,
)
from .manage import ManageExchange, classify
from .metrics import CLIENT_SHARE, QUEUE_TIMEOUT, Observed, observe, response_tokens
from .metrics import NO_BACKEND as NO_BACKEND_REASON
from .metrics import QUEUE_FULL as QUEUE_FULL_REASON
from .models import (
    MERGED_PATHS,
    MODEL_ENDPOINTS,
    affinity_key,
    display_shortest,
    normalize,
    openai_model_id,
    parse_request,
    streams,
    takes_slot,
    well_formed,
)
from .routing import ADMIT, MISSING, WAIT
from .slowclient import BodyBudget, RequestClock

log = logging.getLogger("olb.proxy")

QUEUED, CONNECTING, WAITING, STREAMING, DONE = range(5)

#: Request bodies up to this size go to the backend in the same write as the head (Exchange._send).
SMALL_BODY = 16 * 1024

#: Ollama's own queue-full text (server/sched.go ErrMaxQueue, two spaces and
#: all): clients that special-case it keep working behind olb.
QUEUE_FULL = "server busy, please try again.  maximum pending requests exceeded"
#: Why a client that holds more than its share of the queue is refused.
OVER_SHARE_TEXT = ("too many requests waiting from this client, please try again "
                   "(olb queues fairly across clients: OLB_CLIENT_QUEUE)")


class ProxyContext:
    """What every connection of one worker shares."""


    def __init__(self, config, loop, balancer=None, worker=0):
        self.config = config
        # The settings a request reads, as fields: typed, when compiled
        # (proxy.pxd), they are struct reads, not attribute lookups on Config.
        self.session_header = config.session_header.encode()
        self.session_bound = config.session_bound
        self.first_byte_timeout = config.first_byte_timeout
        self.idle_timeout = config.idle_timeout
        self.resume_max_bytes = config.resume_max_bytes
        self.loop = loop
        self.balancer = balancer
        self.clients: set = set()
        self.gpu = None
        self.telemetry = None
        self.started = 0.0
        self.worker = worker
        #: hostcheck.HostCheck when olb listens on loopback (as Ollama), else None.
        self.host_check = None
        #: Request body bytes this worker holds (slowclient.py).
        self.bodies = BodyBudget(config.max_body_held or config.max_body)
        #: Chat streams cut and continued (olb/resume.py).
        self.resumes = resume.Tally()
        #: Stopping or handing over (olb/lifecycle.py): each connection closes
        #: once its response is written, instead of waiting for another request.
        self.closing = False
        #: auth.KeyRing when OLB_API_KEYS is set, else None (no key asked).
        self.keys = None
        #: dashboard.Samples: what the dashboard shows over time.
        self.samples = None
        #: metrics.Metrics (OLB_METRICS), accesslog.AccessLog (OLB_ACCESS_LOG), or None;
        #: `observing` when either is on (metrics.observe runs at each request's end).
        self.metrics = None
        #: Where the workers publish their counters (several workers), else None.
        self.metrics_dir = None
        self.access_log = None
        self.observing = False
        #: OLB_BACKEND_HEADER's name (bytes), or None.
        self.backend_header = None

    @property
    def balancer(self):
        """The balancer.Balancer of this generation of settings."""
        return self._balancer

    @balancer.setter
    def balancer(self, balancer) -> None:
        self._balancer = balancer
        # What a request reads of it, as fields (typed when compiled, as
        # above); a Balancer sets them once, in its __init__.
        self.models: Any = balancer.models if balancer is not None else None
        self.router: Any = balancer.router if balancer is not None else None
        self.backends: list = balancer.backends if balancer is not None else []


class ClientSideProtocol:
    """One client connection: requests in order, one exchange at a time."""


    @property
    def last_active(self) -> float:
        """When this connection last started or finished a request (olb/lifecycle.py).

        Its clock is monotonic()'s, CLOCK_MONOTONIC, the one uvloop's
        loop.time() reads (through libuv's uv_now: the same clock, coarse,
        in ms): the timers below are set with call_at on deadlines read from
        it. monotonic() is a C call; loop.time() was an attribute lookup and
        a method call, twice a request (~800 instructions)."""
        return self._last_active

    def __init__(self, ctx: ProxyContext, listener: admin.Listener | None = None):
        self.ctx = ctx
        #: admin.Listener on the admin listener; None on the data port.
        self.listener = listener
        #: The API key of the request in progress (auth.KeyRing.check), or None.
        self.key: bytes | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made sets it before any other callback
        self.exchange: Exchange | MergedExchange | ManageExchange | None = None
        self.write_paused = False
        self._timer = None
        self._closed = False
        #: When the current request was read (monotonic()): its duration starts there.
        self.t0 = 0.0

    def connection_made(self, transport) -> None:
        """Called by the loop when a client connects."""
        self.transport = transport
        set_write_limits(transport)
        self.gate = ReadGate(transport)
        self.reader = RequestReader(self.ctx.config.max_body)
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0].encode() if peer else b"unknown"
        self.ctx.clients.add(self)
        self.clock = RequestClock(self.ctx.bodies)
        self._last_active = monotonic()
        self._timer_at = self._last_active + self.ctx.config.keepalive_timeout
        self._timer = self.ctx.loop.call_later(self.ctx.config.keepalive_timeout, self._on_timer)

    def data_received(self, data: bytes) -> None:
        """Called by the transport with bytes the client sent."""
        self.reader.receive(data)
        if self.exchange is None:
            self._last_active = now = monotonic()
            self.clock.received(len(data), now)
            self._process()
            if self.exchange is None and self.reader.waiting and not self._closed:
                self._partial(now)
            elif self.reader.streaming and not self._closed:
                self._time_streamed_body(now)
        elif self.reader.streaming:
            self.exchange.body_received()  # type: ignore[union-attr]  # only a blob upload streams (manage.ManageExchange)'s body (manage.ManageExchange)
        else:
            # A pipelined request arrived while a response is in progress. h11
            # keeps it (it answers PAUSED until the cycle ends); stop reading so
            # what it keeps stays bounded.
            self.gate.pause(PIPELINE)

    def eof_received(self) -> bool:
        """Called by the transport when the client shut its sending side."""
        if self.exchange is not None:
            # A client that closes while its response is pending has gone away
            # (HTTP clients do not half-close); stop the backend's work now,
            # as nginx does unless proxy_ignore_client_abort is set.
            ex, self.exchange = self.exchange, None
            ex.client_gone()
            if self.ctx.observing:
                observe(self.ctx, self, ex, 499)
            return False
        self.reader.receive(b"")
        self._process()
        return True  # answer what was sent before the EOF; _process closes

    def connection_lost(self, exc) -> None:
        """Called by the transport when the connection is closed or broken."""
        self._closed = True
        self.ctx.clients.discard(self)
        self.clock.done()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ex, self.exchange = self.exchange, None
        if ex is not None:
            ex.client_gone()
            if self.ctx.observing:
                observe(self.ctx, self, ex, 499)
        self._release_key()

    def pause_writing(self) -> None:
        """Called by the transport when its write buffer goes over the high-water mark."""
        self.write_paused = True
        ex = self.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.gate.pause(PEER_SLOW)

    def resume_writing(self) -> None:
        """Called by the transport when its write buffer drains below the low-water mark."""
        self.write_paused = False
        ex = self.exchange
        if ex is not None and ex.conn is not None:
            ex.conn.gate.resume(PEER_SLOW)

    # --- request cycle --------------------------------------------------------------------

    def _process(self) -> None:
        reader = self.reader
        while self.exchange is None and not self._closed:
            try:
                req = reader.next_request()
            except OlbError as exc:
                # Malformed or oversized: answer, then close — the rest of what
                # the client sends can no longer be framed.
                if reader.output:
                    self._write_pending(reader)
                self.t0 = monotonic()
                self._reply(error_response(b"/", exc.status_hint, exc.message, closing=True), 0, True,
                            None, exc.status_hint)
                return
            if reader.output:
                self._write_pending(reader)
            if type(req) is ProxyRequest:
                if self._request(req):
                    return
                continue
            if req is NEED_DATA:
                if self.gate.reasons & PIPELINE:  # (resume would check it too: this saves the call)
                    self.gate.resume(PIPELINE)
            elif req is CLOSED:
                self.transport.close()
            return

    def _request(self, req: ProxyRequest) -> bool:
        """A request was read whole: answer it (olb's own answers), or start
        its exchange. True when an exchange took it (no further request is
        read until it ends); False when it was answered at once."""
        self.t0 = monotonic()
        listener = self.listener
        check = self.ctx.host_check if listener is None else listener.host_check
        if check is not None and not check.allows(req.header(b"host")):
            # Ollama's DNS-rebinding protection (hostcheck.py), before
            # anything else: /olb/ included.
            self._reply(FORBIDDEN if req.keep_alive else FORBIDDEN_CLOSE, 403, not req.keep_alive, req)
            return False
        if listener is not None or is_admin_path(req.path):
            # The admin listener serves only admin endpoints; the data
            # port only behind OLB_ADMIN_TOKEN (admin.serve).
            try:
                status, body = admin.serve(req, self.ctx, listener)
            except Exception:  # a bug there must not take the connection down unanswered
                log.exception("admin endpoint %s failed", req.target.decode("latin-1"))
                status = 500
                body = error_response(req.target, 500, "olb: internal error in an admin endpoint",
                                      closing=not req.keep_alive)
            self._reply(body, status, not req.keep_alive, req)
            return False
        keys = self.ctx.keys
        if keys is not None:
            # OLB_API_KEYS (auth.py): 401 without a known key, 429 over its limits.
            key = keys.check(req.header(b"authorization"))
            if type(key) is not bytes:
                self._reply(refusal_response(req, key), key.status, not req.keep_alive)
                return False
            self.key = key
        path = req.path
        if (req.method == b"GET" and self.ctx.models is not None
                and (path in MERGED_PATHS or openai_model_id(path) is not None)):
            merged = MergedExchange(self, req)
            self.exchange = merged
            merged.start()
        elif (op := classify(req.method, path, req.body)) is not None:
            # Model management: every backend it concerns, never an inference slot.
            managed = ManageExchange(self, req, op)
            self.exchange = managed
            managed.start()
        else:
            exchange = Exchange(self, req, takes_slot(req.method, path))
            self.exchange = exchange
            exchange.start()  # (typed, when compiled: a C call)
        return True

    def _write_pending(self, reader) -> None:
        out = reader.take_output()
        if out:
            self.transport.write(out)

    def _reply(self, data: bytes, status: int, closing: bool, req=None, logged: int = 0) -> None:
        """Write a response olb made itself and finish the cycle."""
        self.clock.done()
        self.transport.write(data)
        if self.ctx.observing:
            observe(self.ctx, self, None, status or logged, req, len(data))
        if closing or not status or not self.reader.finish_response(status, closing):
            self._closed = True
            self.transport.close()

    def response_done(self, status: int, closing: bool) -> None:
        """Called by the exchange once its response has been written in full."""
        ex, self.exchange = self.exchange, None
        if self.ctx.observing and ex is not None:
            observe(self.ctx, self, ex, status)
        if self.key is not None:  # (OLB_API_KEYS; a call saved per request without)
            self._release_key()
        self._last_active = now = monotonic()
        self.clock.done()
        if self._closed:
            return
        if closing or self.ctx.closing or not self.reader.finish_response(status, closing):
            self._closed = True
            self.transport.close()
            return
        # Re-parse what is buffered *before* resuming reading, so a pipelined
        # request does not flap the transport (aiohttp web_protocol does the same).
        # Nothing buffered (the usual case): nothing to parse, and no
        # pipelined request paused the reading.
        if self.reader.buffered() or self.gate.reasons & PIPELINE:
            self._process()
            if self.exchange is None and self.reader.waiting and not self._closed:
                self._partial(now)

    def _time_streamed_body(self, now: float) -> None:
        """A streamed body (a blob upload) began: time it by the body rule (slowclient.py)."""
        cfg = self.ctx.config
        self.clock.restart_body(now, 0)
        self._rearm(self.clock.deadline(BODY, 0, now, cfg.header_timeout, cfg.body_timeout, cfg.body_min_rate))

    def _rearm(self, deadline: float) -> None:
        if deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.ctx.loop.call_at(deadline, self._on_timer)

    def _partial(self, now: float) -> None:
        """A request is partly read: refuse it over the body budget, else time it (slowclient.py)."""
        if self.ctx.bodies.over:
            self._reply(error_response(b"/", 503, "server busy, please try again.  too many request bytes "
                                       "held (OLB_MAX_BODY_HELD)", closing=True, retry_after=1), 0, True)
            return
        cfg = self.ctx.config
        # Only a request that spans reads gets here, and the keep-alive
        # timer is re-armed at most once for it.
        self._rearm(self.clock.deadline(self.reader.waiting, self.reader.body_bytes, now, cfg.header_timeout,
                                        cfg.body_timeout, cfg.body_min_rate))

    def _release_key(self) -> None:
        key, self.key = self.key, None
        if key is not None:
            self.ctx.keys.release(key)

    def charge_tokens(self, tokens: int) -> None:
        """Count the tokens of the response in progress against its API key's tpm= limit."""
        if self.key is not None:
            self.ctx.keys.charge(self.key, tokens)

    def abort(self) -> None:
        """End the connection without a clean response end (mid-body failure)."""
        ex, self.exchange = self.exchange, None
        if self.ctx.observing and ex is not None:
            head = getattr(ex, "head", None)
            observe(self.ctx, self, ex, head.status if head is not None else 502)
        self._closed = True
        self.transport.abort()

    def _on_timer(self) -> None:
        # One lazily re-armed timer per connection: the deadline moves with
        # activity without rescheduling on every request (aiohttp's keep-alive).
        cfg = self.ctx.config
        timeout = cfg.keepalive_timeout
        now = monotonic()
        if self.exchange is None:
            reader = self.reader
            if reader.waiting:
                # A partial request is timed from its start, not its last byte (slowclient.py).
                deadline = self.clock.deadline(reader.waiting, reader.body_bytes, now, cfg.header_timeout,
                                               cfg.body_timeout, cfg.body_min_rate)
                if now >= deadline:
                    self._timer = None
                    what = ("head", "HEADER") if reader.waiting == HEAD else ("body", "BODY")
                    self._reply(error_response(b"/", 408, f"the request {what[0]} was not received in time "
                                               f"(OLB_{what[1]}_TIMEOUT)", closing=True), 0, True)
                    return
                timeout = deadline - now
            else:
                idle = now - self._last_active
                if idle >= timeout:
                    self._timer = None
                    self._closed = True
                    self.transport.close()
                    return
                timeout -= idle
        elif self.reader.streaming:
            reader = self.reader
            if self.gate.reasons & BODY_HELD:
                # olb holds the client back (a backend is behind): not its time.
                self.clock.restart_body(now, reader.body_bytes)
            deadline = self.clock.deadline(BODY, reader.body_bytes, now, cfg.header_timeout, cfg.body_timeout,
                                           cfg.body_min_rate)
            if now >= deadline:
                self._timer = None
                ex, self.exchange = self.exchange, None
                ex.client_gone()
                self._reply(error_response(ex.req.target, 408, "the request body was not received in "
                                           "time (OLB_BODY_TIMEOUT)", closing=True), 0, True)
                return
            # Looked at every quarter of OLB_BODY_TIMEOUT, so that a pause by
            # olb costs the client at most that much of its time.
            timeout = min(timeout, deadline - now, cfg.body_timeout / 4)
        self._timer_at = now + timeout
        self._timer = self.ctx.loop.call_later(timeout, self._on_timer)


class Exchange(Observed):
    """One client request on its way through olb (see the state diagram above)."""


    def __init__(self, client: ClientSideProtocol, req: ProxyRequest, slot: bool = True):
        self.client = client
        #: When olb had the request, on the relay's clock (TTFT is measured from here).
        self.started = monotonic()
        #: Takes an inference slot (models.takes_slot): counted in the table
        #: from admit to _release, queued when every slot is busy. Without
        #: one, a healthy backend is picked at once and nothing is counted.
        #: `allowed`, set before start(), restricts either kind.
        self.slot = slot
        #: The backend connection a probe is deciding about (backend_timeout), or None.
        self.probing: BackendSideProtocol | None = None
        # (Read through the typed fields: the arguments are Python objects here.)
        self.ctx = self.client.ctx
        self.req = req
        self.index = NO_BACKEND
        self.conn: BackendSideProtocol | None = None
        self.allowed: bytearray | None = None
        self.attempts = 0
        self.state = QUEUED
        self.head: Head | None = None
        self.closing = not self.req.keep_alive
        self.queue_timer = None
        self.queue_key = None
        self.connect_task: asyncio.Task | None = None
        self.reused_retry = False
        #: The catalogues were re-read once for this request's missing model.
        self.rechecked = False
        self.model: str | None = None
        #: Its runner options (models.parse_request): () for the defaults.
        self.runner = ()
        #: 64-bit key of the conversation this request belongs to, or None.
        self.affinity: int | None = None
        #: Backends this request may no longer try (they failed it), or None.
        self.excluded: bytearray | None = None
        #: The list the relay keeps the streamed body in (Relay.keep), while
        #: a chat stream could be continued elsewhere (olb/resume.py), or None.
        self.kept: list[bytes | None] | None = None
        #: A continued stream's Continuation, or None.
        self.resumed: Continuation | None = None
        # For the metrics and the access log (metrics.observe): the model as
        # the request names it (normalised), the backend last tried (URL), when
        # the request got its slot, its first response byte, and started a
        # load (0.0: not yet), the bytes sent to the client, the token
        # counts read from the response's end.
        self.name: str | None = None
        self.served = ""
        self.t_admit = self.t_first = self.t_load = 0.0
        self.sent = 0
        self.tokens: tuple | None = None

    def start(self) -> None:
        """Find the request a backend: the balancer's router decides (olb/routing.py)."""
        req = self.req
        if self.attempts == 0:
            ctx = self.ctx
            session = req.header(ctx.session_header) if ctx.session_bound else None
            if session:
                self.affinity = affinity_key(session)
            template = MODEL_ENDPOINTS.get(req.path) if req.method == b"POST" else None
            if template is not None:
                name, conversation, runner = parse_request(req.body)
                if name is not None:
                    self.name = model = normalize(name)
                    if conversation is not None and self.affinity is None and ctx.session_bound:
                        self.affinity = affinity_key(model.encode(), conversation)
                    if ctx.models is not None:
                        self.model = model
                        self.runner = runner
        self._route()

    def _route(self) -> None:
        """Ask the router, then carry out its decision."""
        router = self.ctx.router
        if not self.slot:
            decision = router.route_no_slot(self.model, self.allowed, self.excluded)
        elif self.model is None:
            decision = router.route_any(self.allowed, self.affinity)
        else:
            decision = router.route(self.model, self.runner, self.affinity, self.excluded)
        kind = decision.kind
        if kind == ADMIT:
            self.admit(decision.index)  # marks a placement (ModelDirectory.mark_placed)
            # Those already waiting for the model's warm backends may take it.
            if decision.placed and self.ctx.balancer.queue:
                self.ctx.balancer.wake()
        elif kind == WAIT:
            if self._enqueue(decision.mask):
                self.state = QUEUED
        elif decision.reason == MISSING:
            if not self.rechecked:
                # Not listed anywhere as of the last poll: read the
                # catalogues again before refusing (ModelDirectory.recheck).
                self.rechecked = True
                self.state = CONNECTING  # client_gone cancels the task below
                self.connect_task = self.ctx.loop.create_task(self._recheck())
                return
            if not well_formed(self.req.body):
                # Ollama binds the whole request before it looks the model
                # up: a body malformed past what routing read is a backend's
                # 400 to answer, not olb's 404 (models.well_formed).
                self.model = None
                self._route()
                return
            # Answer as Ollama would, without touching a backend; in the
            # name as the client sent it.
            template = MODEL_ENDPOINTS[self.req.path]
            self._fail(NotFound(template.format(name=parse_request(self.req.body)[0])))
        else:
            self.queue_unusable()

    async def _recheck(self) -> None:
        balancer = self.ctx.balancer
        await balancer.models.recheck([b.index for b in balancer.backends if b.up])
        self.connect_task = None
        if self.state == CONNECTING and self.client.exchange is self:
            self.state = QUEUED
            self._route()

    def _enqueue(self, allowed) -> bool:
        self.allowed = allowed
        cfg = self.ctx.config
        client, priority = routing.queue_identity(self.req, cfg.client_header, cfg.priority_header,
                                                  self.client.peer_ip)
        if self.client.key is not None:
            # With OLB_API_KEYS the checked key is who asks, whatever a header claims.
            client = b"key:" + self.client.key
        result = self.ctx.balancer.enqueue(self, client, priority)
        if result == QUEUED_OK:
            return True
        if result == OVER_SHARE:
            self._reject(CLIENT_SHARE, TooManyRequests(OVER_SHARE_TEXT))
        else:
            self._reject(QUEUE_FULL_REASON, NoBackendAvailable(QUEUE_FULL))
        return False

    def _reject(self, reason: str, error: OlbError) -> None:
        """olb refuses the request itself (olb_rejections_total's `reason`)."""
        metrics = self.ctx.metrics
        if metrics is not None:
            metrics.rejected(reason)
        self._fail(error)

    def queue_evicted(self) -> None:
        """A lighter client took this request's place in a full queue."""
        self._reject(CLIENT_SHARE, TooManyRequests(OVER_SHARE_TEXT))

    # --- called by the balancer's queue --------------------------------------------------------

    def admit(self, index: int) -> None:
        """A backend slot is ours (already counted in the table), or, for a
        request without one, the backend Balancer.pick chose."""
        self.index = index
        backend = self.ctx.backends[index]
        self.served = backend.url
        if not self.t_admit:
            self.t_admit = monotonic()
        self.t_load = 0.0
        if self.slot and self.model is not None:
            models = self.ctx.models
            models.admitted(self.model, index, 1)
            if not models.loaded_mask(self.model)[index] or not models.runner_matches(self.model, index,
                                                                                        self.runner):
                self.t_load = self.t_admit if self.attempts == 0 else monotonic()
                if self.ctx.metrics is not None:
                    self.ctx.metrics.load_started(self.model, self.served)
                # The model loads there (whether the router placed it or the
                # queue admitted it): the requests that follow wait for this
                # load, its victims leave that backend, and its catalogue is
                # re-read when it answers (ModelDirectory.mark_placed).
                models.mark_placed(self.model, index, self.runner)
        self.state = CONNECTING
        conn = backend.pool.take()
        if conn is not None:
            self._send(conn, reused=True)
        else:
            self.connect_task = self.ctx.loop.create_task(self._connect(index))

    def queue_expired(self) -> None:
        self._reject(QUEUE_TIMEOUT, NoBackendAvailable(
            f"server busy, please try again.  no backend became free within "
            f"{self.ctx.config.queue_timeout:g}s (OLB_QUEUE_TIMEOUT)"))

    def moved(self, ctx) -> None:
        """Called by olb/lifecycle.py on a reload while this request waits in
        the queue: it is routed again under the new configuration (its masks
        were the old backend table's), in the old queue's order."""
        self.ctx = ctx
        self.allowed = self.excluded = None
        if ctx.balancer.models is None:
            self.model = None
        self._route()

    def queue_closed(self) -> None:
        """olb is stopping (SIGTERM): the queue is answered at once (olb/lifecycle.py)."""
        self._fail(NoBackendAvailable("server busy, please try again.  olb is shutting down"))

    def reroute(self) -> None:
        """Its queue mask no longer has a usable backend: decide again."""
        if self.model is not None:
            self._route()
        else:
            self.queue_unusable()

    def queue_unusable(self) -> None:
        balancer = self.ctx.balancer
        errors = [b.last_error for b in balancer.backends if b.last_error]
        detail = f": {errors[-1]}" if errors else ""
        self._reject(NO_BACKEND_REASON, BackendConnectError(
            f"no backend reachable ({len(balancer.backends)} configured){detail}"))

    # --- backend side ------------------------------------------------------------------

    async def _connect(self, index: int) -> None:
        pool = self.ctx.balancer.backends[index].pool
        try:
            conn = await pool.connect()
        except (OSError, asyncio.TimeoutError) as exc:
            self.connect_task = None
            if self.state != CONNECTING:
                return
            if local.is_local(exc):
                # olb's own descriptors (or memory) ran out, not the backend:
                # refuse this client, count nothing against the backend.
                local.report(f"connect to {pool.host}:{pool.port} not attempted", exc)
                self._backend_failed(LocalResourceError(local.describe(exc)), retry=False, mark_down=False)
                return
            reason = f"connect to {pool.host}:{pool.port} failed: " + (
                "timed out" if isinstance(exc, asyncio.TimeoutError) else (exc.strerror or str(exc)))
            self._backend_failed(BackendConnectError(reason), retry=True, mark_down=True)
            return
        self.connect_task = None
        if self.state != CONNECTING:  # the client left while we connected
            pool.put(conn)
            return
        self._send(conn, reused=False)

    def _send(self, conn, reused: bool) -> None:
        self.conn = conn
        self.state = WAITING
        conn.attach(self, reused)
        req = self.req
        body = req.body
        # A small body goes in the head's buffer: one write (one send(), no
        # writev and no list in uvloop); a copy of a few KiB costs less than
        # the second buffer.
        inline = len(body) <= SMALL_BODY
        head = upstream_head_parts(req.method, req.target, req.http_version == b"1.0", req.headers, body,
                                   req.has_body_framing, conn.pool.hostport, self.client.peer_ip, inline)
        if inline:
            conn.transport.write(head)
        else:
            conn.transport.writelines((head, body))

    def on_head(self, head, raw: bytes) -> bytes | None:
        """The backend's response head arrived: the head to forward (the first byte to the client).

        The caller writes it, with the body bytes that came along. Returns
        None when the exchange let go of the connection instead: a
        backend that answers 503 (Ollama's "server busy": its queue is full)
        or 404 for a model it was thought to have is not the client's answer
        while another backend may serve the request.
        """
        # A 404 is the model's only in JSON (Ollama's handlers); gin's
        # text/plain "404 page not found" is a route the backend lacks (an
        # older Ollama without /v1/messages), which says nothing of its models.
        if ((head.status == 503 or (head.status == 404 and head.content_type.startswith(b"application/json")))
                and self.model is not None and self._retry_elsewhere(head.status)):
            return None
        if self.resumed is not None:
            return self._continued_head(head)
        self.state = STREAMING
        self.head = head
        self.t_first = monotonic()
        if self.slot and self.model is not None and head.status == 200:
            # Ollama answers once the model is loaded: it is ready there now
            # (for a stream, long before the response ends).
            models = self.ctx.models
            models.answered(self.model, self.index, self.runner)
            if self.t_load and self.ctx.metrics is not None:
                self.ctx.metrics.load_answered(self.model, self.served, self.t_first - self.t_load)
        if self.slot and self.ctx.samples is not None:
            self.ctx.samples.first_byte(self.t_first - self.started)
        if head.framing == UNTIL_CLOSE:
            self.closing = True
        elif (head.status == 200 and head.framing == CHUNKED and self.ctx.resume_max_bytes
              and resume.stream_kind(self.req.path, head.content_type)):
            # A chat stream: keep what is forwarded, by reference, in case
            # its backend dies (_resume).
            conn = self.conn
            assert conn is not None  # on_head: the connection that read the head is attached
            self.kept = conn.keep = []
            conn.keep_left = self.ctx.resume_max_bytes
        out = downstream_head(head, raw, self.closing)
        if self.ctx.backend_header is not None:
            # OLB_BACKEND_HEADER: one more field before the head's empty line.
            out = b"%s%s: %s\r\n\r\n" % (out[:-2], self.ctx.backend_header,
                                           self.ctx.backends[self.index].url.encode())
        self.sent = len(out)
        return out

    def _continued_head(self, head) -> bytes | None:
        """The head of a continuation (_resume): the client has its head
        already, so nothing of it is forwarded; the body is spliced on."""
        cont = self.resumed
        assert cont is not None  # on_head calls this only for a continuation
        if (head.status != 200 or head.framing != CHUNKED
                or resume.stream_kind(self.req.path, head.content_type) != cont.kind):
            conn = self._abort_conn()
            self._backend_failed(BackendProtocolError(
                f"backend {conn.pool.host}:{conn.pool.port} answered the continued stream with "
                f"{head.status} {head.content_type.decode('latin-1')}"), retry=False, mark_down=False)
            return None
        self.state = STREAMING
        if self.slot and self.model is not None:
            self.ctx.balancer.models.answered(self.model, self.index, self.runner)
        conn = self.conn
        assert conn is not None  # attached: it read this head
        if self.kept is not None:
            conn.keep = self.kept
            conn.keep_left = cont.budget
        if cont.splice is not None:
            feed, write = cont.splice.feed, self.client.transport.write

            def forward(data):
                out = feed(data)
                if out:
                    write(out)

            conn.forward = forward
        return b""

    def _retry_elsewhere(self, status: int) -> bool:
        if self.attempts >= self.ctx.config.retries:
            return False
        models = self.ctx.balancer.models
        index = self.index
        if status == 404:
            # Its catalogue changed behind olb's back (a delete, a pull
            # elsewhere): forget the model there and re-read the catalogue.
            models.mark_missing(self.model, index)
            self.ctx.balancer.refresh_models(index)
        candidates = models.installed_mask(self.model)
        excluded = self.excluded
        if not any(c and i != index and not (excluded and excluded[i]) for i, c in enumerate(candidates)):
            return False
        conn = self._abort_conn()  # the rest of that response is not wanted
        reason = ("queue full (503)" if status == 503 else "model not found (404)")
        self._backend_failed(BackendConnectError(f"backend {conn.pool.host}:{conn.pool.port}: {reason}"),
                             retry=True, mark_down=False)
        return True

    def on_end(self, reusable: bool, last: bytes = b"") -> None:
        """The backend's response has been forwarded in full; `last` is the body's last piece."""
        conn, self.conn = self.conn, None
        head = self.head
        assert conn is not None and head is not None  # on_end follows on_head on the attached connection
        if head.framing != NO_BODY:  # (the scanner was not reset for a body-less answer)
            self.sent += conn.scanner.bytes_seen
        observed = self.ctx.observing and self.name is not None
        tokens = None
        if head.status == 200 and (observed or self.slot):
            # The token counts are in the body's last bytes (metrics.read_tokens):
            # the read that ended it and the two before it, read once here for
            # the metrics and access log, the dashboard and the tpm= limit.
            tokens = response_tokens(conn.tail2, conn.tail1, last)
            if observed:
                self.tokens = tokens
        if self.slot:
            prompt, generated = (tokens[0], tokens[1]) if tokens is not None else (0, 0)
            if self.ctx.samples is not None:
                self.ctx.samples.request_done(generated)
            self.client.charge_tokens(prompt + generated)
        conn.detach()
        pool = conn.pool
        self.ctx.backends[self.index].strikes = 0
        self._release()
        if reusable:
            pool.put(conn)
        else:
            conn.close()
        self.state = DONE
        if self.resumed is not None:
            self.ctx.resumes.resumed += 1
        self.client.response_done(head.status, self.closing)

    def backend_lost(self, error: OlbError, *, got_bytes: bool, reused: bool, at_boundary: bool) -> None:
        """The backend connection closed or broke before the response ended."""
        self.conn = None
        if self.state == WAITING and not got_bytes and reused and not self.reused_retry:
            # A parked connection the backend closed just as we reused it: the
            # request never reached it. Try once more on a fresh connection to
            # the same backend, without counting an attempt.
            self.reused_retry = True
            self.state = CONNECTING
            self.connect_task = self.ctx.loop.create_task(self._connect(self.index))
            return
        # Nothing forwarded yet (a backend that closed mid-head included):
        # another backend may still answer.
        self._backend_failed(error, retry=self.state == WAITING, mark_down=False, at_boundary=at_boundary,
                             strike=True)

    def backend_timeout(self, at_boundary: bool) -> None:
        """The backend's first byte, or its next one mid-stream, is overdue.

        A timeout alone does not tell slow from dead: Ollama sends a
        non-streamed answer whole, after its last token, and holds requests
        past OLLAMA_NUM_PARALLEL in its own queue without a byte. So it is
        no failure strike: the backend is probed (Balancer.check) and marked
        down only if the probe fails. A non-streamed request whose backend
        answers the probe waits on, one more OLB_FIRST_BYTE_TIMEOUT at a
        time; a streamed one ends here with 504 (or, mid-stream, an error
        line). See docs/operations.md, Timeouts.
        """
        cfg = self.ctx.config
        balancer = self.ctx.balancer
        index = self.index
        url = balancer.backends[index].url
        if self.state == STREAMING:
            msg = f"backend {url} sent nothing for {cfg.idle_timeout:g}s (OLB_IDLE_TIMEOUT)"
        else:
            msg = f"backend {url} did not answer within {cfg.first_byte_timeout:g}s (OLB_FIRST_BYTE_TIMEOUT)"
            req = self.req
            if not streams(req.method, req.path, req.body):
                self.probing = self.conn
                balancer.check(index, msg).add_done_callback(self._probed)
                return
        self._abort_conn()
        balancer.check(index, msg)
        self._backend_failed(BackendTimeout(msg), retry=False, mark_down=False, at_boundary=at_boundary)

    def _probed(self, probe) -> None:
        """The probe backend_timeout started for a non-streamed request is done."""
        conn, self.probing = self.probing, None
        if probe.cancelled() or self.conn is not conn or self.state != WAITING:
            return  # answered meanwhile, or ended otherwise
        error = probe.result()
        if error is None:
            conn.wait_longer()  # type: ignore[union-attr]  # slow, not dead (conn is self.conn, checked above)
            return
        url = self.ctx.balancer.backends[self.index].url
        self._abort_conn()
        self._backend_failed(BackendTimeout(
            f"backend {url} did not answer within {self.ctx.config.first_byte_timeout:g}s "
            f"(OLB_FIRST_BYTE_TIMEOUT) and then failed a health check: {error}"), retry=False, mark_down=False)

    def backend_protocol_error(self, error: BackendProtocolError, at_boundary: bool) -> None:
        self._abort_conn()
        self._backend_failed(error, retry=False, mark_down=False, at_boundary=at_boundary,
                             strike=True)

    def _backend_failed(self, error: OlbError, *, retry: bool, mark_down: bool,
                        at_boundary: bool = False, strike: bool = False) -> None:
        index = self.index
        self._release()
        balancer = self.ctx.balancer
        if mark_down:
            balancer.mark_down(index, error.message)
        elif strike:
            balancer.strike(index, error.message)
        if self.state == STREAMING:
            # A spliced SSE stream reaches the client in whole chunks only.
            at_boundary = at_boundary or (self.resumed is not None and self.resumed.splice is not None)
            if self.kept is not None and self.resumed is None:
                self.ctx.resumes.cut += 1
            if not self._resume(index, error, at_boundary):
                self._fail_mid_stream(error, at_boundary)
            return
        if retry and self.attempts < self.ctx.config.retries:
            self.attempts += 1
            if self.excluded is None:
                self.excluded = bytearray(balancer.table.n)
            self.excluded[index] = 1
            self.allowed = bytearray(not x for x in self.excluded)
            if self.ctx.metrics is not None:
                self.ctx.metrics.retried(balancer.backends[index].url)
            log.info("retrying %s on another backend after: %s", self.req.target.decode("latin-1"),
                     error.message)
            self.start()
            return
        self._fail(error)

    def _abort_conn(self):
        """Let go of the backend connection and close it at once; returns it (or None)."""
        conn, self.conn = self.conn, None
        if conn is not None:
            if self.head is not None and self.head.framing != NO_BODY:
                self.sent += conn.scanner.bytes_seen  # (for the access log: a response cut short)
            conn.detach()
            conn.abort()
        return conn

    # --- endings ---------------------------------------------------------------------

    def _release(self) -> None:
        index, self.index = self.index, NO_BACKEND
        if index != NO_BACKEND and self.slot:
            if self.model is not None:
                models = self.ctx.models
                models.admitted(self.model, index, -1)
            self.ctx._balancer.release(index)  # (the property's field: typed, a C call)

    def _resume(self, index: int, error: OlbError, at_boundary: bool) -> bool:
        """Continue a broken chat stream on another backend that has the
        model (olb/resume.py; docs/operations.md, "Streams that survive
        their backend"). False when it cannot be: the caller ends the stream
        with an error line."""
        kept, self.kept = self.kept, None
        head = self.head
        if kept is None or not at_boundary or self.client.exchange is not self:
            return False
        assert head is not None  # kept is set by on_head, with the head
        kind = resume.stream_kind(self.req.path, head.content_type)
        progress = resume.read_progress(kind, kept)
        if progress is None:
            return False
        if progress.finished:
            # Only the end of the body was missing: end it, without an error.
            self.state = DONE
            self.ctx.resumes.resumed += 1
            self.client.transport.write(resume.end_of_stream(kind, progress))
            self.client.response_done(head.status, self.closing)
            return True
        cont = self.resumed
        body = resume.continuation_body(kind, cont.body if cont else self.req.body, progress)
        if body is None:
            return False
        balancer = self.ctx.balancer
        if self.excluded is None:
            self.excluded = bytearray(balancer.table.n)
        self.excluded[index] = 1
        excluded = self.excluded
        have = balancer.models.installed_mask(self.model) if self.model is not None else None
        if not any(b.up and not excluded[b.index] and (have is None or have[b.index]) for b in balancer.backends):
            return False  # no other backend to continue on: the error as it is
        self.allowed = bytearray(not x for x in excluded)
        if cont is None:
            self.resumed = cont = Continuation(kind, self.req.body, None, error.message)
        if kind == resume.SSE and cont.splice is None and progress.id is not None and type(progress.created) is int:
            # From the first event the client got on: a stream cut before
            # any is forwarded as the continuation sends it.
            cont.splice = resume.SseSplice(progress.id, progress.created)
        cont.budget = self.ctx.config.resume_max_bytes - sum(map(len, kept))  # type: ignore[arg-type]  # the relay keeps bytes only
        self.kept = kept
        req = self.req
        self.req = ProxyRequest(req.method, req.target, req.http_version, req.headers, body, req.keep_alive,
                                True)
        # A continuation gets its own OLB_RETRIES before its first byte; each
        # resume excludes the backend that failed, so they are bounded too.
        self.attempts = 0
        log.info("continuing a chat stream on another backend after %d tokens: %s", progress.tokens,
                 error.message)
        self._route()
        return True

    def _fail(self, error: OlbError) -> None:
        """Answer with an error before any response byte was forwarded."""
        if self.resumed is not None:
            # A continuation found no backend: the client has a stream
            # already, stopped on a chunk boundary. Its error says why the
            # stream broke first.
            self._fail_mid_stream(type(error)(f"{self.resumed.cause}; continuing the stream on another "
                                              f"backend failed: {error.message}"), True)
            return
        self.state = DONE
        req = self.req
        client = self.client
        if client.exchange is not self:
            return
        out = error_response(req.target, error.status_hint, error.message, closing=self.closing,
                             retry_after=error.retry_after, head_only=req.method == b"HEAD")
        self.sent = len(out)
        client.transport.write(out)
        client.response_done(error.status_hint, self.closing)

    def _fail_mid_stream(self, error: OlbError, at_boundary: bool) -> None:
        self.state = DONE
        client = self.client
        if client.exchange is not self:
            return
        head = self.head
        assert head is not None  # mid-stream: on_head set it
        log.warning("stream from backend failed after the first byte: %s", error.message)
        if head.framing == CHUNKED and at_boundary:
            # Ollama's own shape for a failure mid-stream: a last error line, a
            # clean end of the chunked body, status 200 already sent.
            tail = stream_error_tail(head, error.message)
            self.sent += len(tail)
            client.transport.write(tail)
            client.response_done(head.status, self.closing)
        else:
            # A Content-Length or close-delimited body cannot be ended early in
            # a way the client would not mistake for a complete one: cut it.
            client.abort()

    def client_gone(self) -> None:
        """The client went away: stop the backend's work now and release."""
        state, self.state = self.state, DONE
        if state == QUEUED:
            self.ctx.balancer.dequeue(self)
        task, self.connect_task = self.connect_task, None
        if task is not None:
            task.cancel()
        # Closing the backend socket is what makes Ollama cancel the generation.
        self._abort_conn()
        self._release()


class Continuation:
    """A chat stream being continued on another backend (Exchange._resume)."""


    def __init__(self, kind: int, body: bytes, splice, cause: str):
        #: resume.NDJSON or resume.SSE.
        self.kind = kind
        #: The client's own request body: each continuation is built from it.
        self.body = body
        #: resume.SseSplice for an SSE stream (its events get the first id), else None.
        self.splice = splice
        #: What the relay may still keep of the stream (OLB_RESUME_MAX_BYTES less what it holds).
        self.budget = 0
        #: Why the stream broke the first time (the error line names it if no continuation works).
        self.cause = cause


class MergedExchange:
    """GET /api/tags, /api/ps or /v1/models answered from every backend at once.

    One Ollama lists what it has; olb is many, so it asks each healthy
    backend (refreshing the model directory as it goes) and merges the
    answers, as a client expects of "one Ollama".
    """


    def __init__(self, client: ClientSideProtocol, req: ProxyRequest):
        self.client = client
        # (Read through the typed fields: the arguments are Python objects here.)
        self.ctx = self.client.ctx
        self.req = req
        self.conn = None
        self.task = None

    def start(self) -> None:
        self.task = self.ctx.loop.create_task(self._run())

    async def _run(self) -> None:
        balancer = self.ctx.balancer
        models = balancer.models
        healthy = [b.index for b in balancer.backends if b.up]
        answered = await asyncio.gather(*(models.refresh(i) for i in healthy))
        self.task = None
        client = self.client
        if client.exchange is not self:
            return
        closing = not self.req.keep_alive
        head_only = self.req.method == b"HEAD"
        if not any(answered):
            client.transport.write(error_response(
                self.req.target, 502, f"no backend answered GET {self.req.path.decode()}",
                closing=closing, head_only=head_only))
            client.response_done(502, closing)
            return
        path = self.req.path
        if path == b"/api/tags":
            doc = models.merged_tags()
        elif path == b"/api/ps":
            doc = models.merged_ps()
        elif path == b"/v1/models":
            doc = models.merged_openai_models()
        else:
            self._retrieve(models, openai_model_id(path), closing, head_only)  # type: ignore[arg-type]  # an id: not a listing path
            return
        body = orjson.dumps(doc)
        client.transport.write(simple_response(200, body, closing=closing, head_only=head_only))
        client.response_done(200, closing)

    def _retrieve(self, models, model_id: str, closing: bool, head_only: bool) -> None:
        """GET /v1/models/{id}: the merged view's entry, or the 404 Ollama's
        ShowHandler gives (the name as DisplayShortest) in the OpenAI shape
        (middleware/openai.go RetrieveWriter; json.Encoder's newline)."""
        doc = models.openai_model(model_id)
        if doc is None:
            status = 404
            body = error_body(self.req.target, f"model '{display_shortest(model_id)}' not found", 404) + b"\n"
        else:
            status = 200
            body = orjson.dumps(doc) + b"\n"
        self.client.transport.write(simple_response(status, body, content_type=b"application/json",
                                                    closing=closing, head_only=head_only))
        self.client.response_done(status, closing)

    def client_gone(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()


class BackendSideProtocol(Relay):
    """One TCP connection to a backend: idle in its pool, or serving one exchange.

    The per-chunk path (data_received once the head is through) is
    Relay's, compiled in _relay.pyx; it calls back _read_head, _end and
    _protocol_error below.  Fields it shares with this class: head,
    scanner, forward (the client's transport.write) and last_io.
    """


    def __init__(self, pool):
        self.pool = pool
        self.loop = pool.loop
        self.transport = None
        self.exchange: Exchange | None = None
        self.write_paused = False
        self._buf = b""
        self._got_bytes = False
        self._reused = False
        self._timer = None
        #: When the armed timer fires, in monotonic() seconds (_arm).
        self._timer_at = 0.0
        self._closed = False
        self._head_request = False
        self._attached_at = 0.0

    def connection_made(self, transport) -> None:
        """Called by the loop when the connection to the backend is open."""
        self.transport = transport
        set_write_limits(transport)
        # Timed: a backend's silence counts only while olb reads from it.
        self.gate = TimedReadGate(transport, monotonic, self._reading_resumed)

    def reusable(self) -> bool:
        return not self._closed and self.exchange is None and not self.transport.is_closing()

    def attach(self, exchange: Exchange, reused: bool) -> None:
        self.exchange = exchange
        self._buf = b""
        self.head = None
        self._got_bytes = False
        self._reused = reused
        self._head_request = exchange.req.method == b"HEAD"
        self.tail1 = self.tail2 = None
        client = exchange.client
        self.forward = client.transport.write
        if client.write_paused:
            self.gate.pause(PEER_SLOW)
        self._attached_at = self.last_io = now = monotonic()
        self._arm(now + exchange.ctx.first_byte_timeout, now)

    def wait_longer(self) -> None:
        """Another OLB_FIRST_BYTE_TIMEOUT for the first byte (the backend
        answered a probe: slow, not dead)."""
        self._attached_at = monotonic()
        # A later deadline: the armed timer fires first and re-arms (_on_timer).

    def _arm(self, deadline: float, now: float) -> None:
        """Make sure the timer fires by `deadline` (monotonic() seconds).

        One lazily re-armed timer per connection, kept across the requests
        it carries: a timer that fires no later than the deadline is left
        alone, and _on_timer works out the real deadline when it fires and
        arms the rest.  Deadlines move later with every request (and with
        every byte), so in steady traffic no request creates or cancels a
        timer (each was a uvloop TimerHandle and a libuv timer: 2 created
        and 2 cancelled per request before; nginx keeps its timers in a
        tree for the same reason).
        """
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_later(deadline - now, self._on_timer)

    def _reading_resumed(self, paused: float) -> None:
        """Reading resumed after `paused` seconds (the client did not drain
        its writes): that time was not the backend's silence."""
        self.last_io += paused
        self._attached_at += paused

    def detach(self) -> None:
        ex, self.exchange = self.exchange, None
        if ex is not None and self.write_paused:
            ex.client.gate.resume(PEER_SLOW)
        self.forward = None
        self.head = None
        self.keep = None
        self.tail1 = self.tail2 = None
        # The timer stays armed (_arm): it stops when it fires unattached.
        if self.gate.reasons:  # (resume would check it too: this saves the call)
            self.gate.resume(PEER_SLOW)

    def close(self) -> None:
        self._closed = True
        self.transport.close()

    def abort(self) -> None:
        self._closed = True
        self.transport.abort()

    # --- transport callbacks (data_received: Relay's) ---------------------------------------

    def _read_head(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:
            # Bytes on an idle connection: the backend is confused; drop it.
            self.abort()
            return
        self.last_io = now = monotonic()
        if not self._got_bytes:
            self._got_bytes = True
            # From the first byte on, silence is timed by OLB_IDLE_TIMEOUT,
            # not by what is left of the first-byte one.
            self._arm(now + ex.ctx.idle_timeout, now)
        buf = self._buf + data if self._buf else data
        try:
            parsed = parse_response_head(buf, self._head_request)
        except BackendProtocolError as exc:
            self._protocol_error(exc.message)
            return
        if parsed is None:
            self._buf = buf
            return
        head, size = parsed
        self._buf = b""
        rest = buf[size:]
        if head.status < 200:
            # An interim response (we never send Expect upstream, but a backend
            # may still send 100/103): not forwarded, the final head follows.
            if rest:
                self._read_head(rest)
            return
        self.head = head
        framing = head.framing
        scanner = self.scanner
        if framing == CHUNKED:
            scanner.expect_chunked()
        elif framing == LENGTH:
            scanner.expect_length(head.length)
        elif framing == UNTIL_CLOSE:
            scanner.expect_close()
        raw = buf[:size]
        out = ex.on_head(head, raw)
        if out is None:
            return
        forward = self.forward  # attach() set it; on_head may have replaced it (a continuation's splice)
        assert forward is not None
        if framing == NO_BODY or (framing == LENGTH and head.length == 0):
            forward(out)
            self._finish(rest, 0)
            return
        if not rest:
            forward(out)
            return
        try:
            end = scanner.feed(rest)
        except ValueError as exc:
            forward(out)
            self._protocol_error(f"backend sent a malformed chunked body: {exc}")
            return
        if self.keep is not None:
            self.keep_data(rest)
        # The head and the first body bytes leave in one write: one syscall,
        # one segment (a small answer or a first token usually arrives whole,
        # with its head). When the head goes out unchanged, that is the read
        # buffer itself, not a copy.
        if out is raw and (end < 0 or end == len(rest)):
            forward(buf)
        else:
            forward(out + (rest if end < 0 else rest[:end]))
        if end >= 0:
            self._finish(rest, end)
        else:
            self.tail1 = rest

    def _end(self, data: bytes, end: int) -> None:
        if end:
            self.forward(data if end == len(data) else data[:end])  # type: ignore[misc]  # attached: set
        self._finish(data, end)

    def _finish(self, data: bytes, end: int) -> None:
        # Bytes beyond the response mean the backend is not speaking plain
        # request/response on this connection; do not reuse it.
        # Only while attached, after the head: both are set.
        head = self.head
        reusable = head.keep_alive and end == len(data)  # type: ignore[union-attr]
        self.exchange.on_end(reusable, data[:end] if end < len(data) else data)  # type: ignore[union-attr]

    def _protocol_error(self, message: str) -> None:
        ex = self.exchange
        if ex is not None:
            ex.backend_protocol_error(BackendProtocolError(message), self._at_boundary())
        else:
            self.abort()

    def _at_boundary(self) -> bool:
        return self.head is not None and self.scanner.at_chunk_boundary

    def eof_received(self) -> bool:
        """Called by the transport when the backend closed its sending side."""
        ex = self.exchange
        if ex is not None and self.head is not None and self.head.framing == UNTIL_CLOSE:
            ex.on_end(False)
        return False  # close; connection_lost reports anything unfinished

    def connection_lost(self, exc) -> None:
        """Called by the transport when the connection is closed or broken."""
        self._closed = True
        self.pool.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ex, self.exchange = self.exchange, None
        if ex is not None:
            if self.write_paused:
                ex.client.gate.resume(PEER_SLOW)
            pool = self.pool
            what = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            ex.backend_lost(
                BackendConnectError(f"backend {pool.host}:{pool.port} failed mid-request ({what})"),
                got_bytes=self._got_bytes, reused=self._reused, at_boundary=self._at_boundary())

    def pause_writing(self) -> None:
        """Called by the transport when the upstream write buffer goes over the high-water mark."""
        self.write_paused = True
        ex = self.exchange
        if ex is not None:
            ex.client.gate.pause(PEER_SLOW)

    def resume_writing(self) -> None:
        """Called by the transport when the upstream write buffer drains."""
        self.write_paused = False
        ex = self.exchange
        if ex is not None:
            ex.client.gate.resume(PEER_SLOW)

    def _on_timer(self) -> None:
        ex = self.exchange
        if ex is None:
            self._timer = None
            return
        cfg = ex.ctx.config
        now = monotonic()
        if self.head is None and not self._got_bytes:
            remaining = self._attached_at + cfg.first_byte_timeout - now
            if self.gate.paused:
                remaining = cfg.first_byte_timeout  # not reading: no silence to time
        else:
            remaining = self.last_io + cfg.idle_timeout - now
            if self.gate.paused:
                remaining = cfg.idle_timeout
        if remaining > 0:
            self._timer_at = now + remaining
            self._timer = self.loop.call_later(remaining, self._on_timer)
            return
        self._timer = None
        ex.backend_timeout(self._at_boundary())
