"""proxy.py's Protocols wired to mock transports: no sockets.

Each test drives ClientSideProtocol and BackendSideProtocol by hand, the way
the event loop would, and checks what is written where and which side's
reading is paused (uvicorn's tests/protocols style).
"""

import dataclasses

import pytest

from olb import config as config_mod
from olb.balancer import Balancer
from olb.flow import PEER_SLOW, PIPELINE, ReadGate
from olb.proxy import BackendSideProtocol, ClientSideProtocol, ProxyContext

REQ = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


class MockTransport:
    def __init__(self, peer=("127.0.0.1", 5555)):
        self.written = bytearray()
        self.read_paused = False
        self.closed = False
        self.aborted = False
        self.peer = peer
        self.limits = None

    def write(self, data):
        assert not self.closed
        self.written += data

    def writelines(self, parts):
        for p in parts:
            self.write(p)

    def pause_reading(self):
        assert not self.read_paused, "pause_reading called twice"
        self.read_paused = True

    def resume_reading(self):
        assert self.read_paused, "resume_reading without pause"
        self.read_paused = False

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = self.aborted = True

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default


@pytest.fixture
def wired(loop):
    """A client connection and one idle backend connection in the pool."""
    cfg = dataclasses.replace(
        config_mod.Config(health_interval=0, gpu_poll=0),
        backends=config_mod.parse_backends("http://127.0.0.1:11435", 4))
    ctx = ProxyContext(cfg, loop)
    ctx.balancer = Balancer(cfg, loop, BackendSideProtocol)
    pool = ctx.balancer.backends[0].pool
    backend = BackendSideProtocol(pool)
    backend.connection_made(MockTransport())
    pool.put(backend)
    client = ClientSideProtocol(ctx)
    client.connection_made(MockTransport())
    yield ctx, client, backend
    client.connection_lost(None)
    loop.run_until_complete(ctx.balancer.close())


def test_request_goes_upstream_and_response_comes_back(wired):
    ctx, client, backend = wired
    client.data_received(REQ)
    sent = bytes(backend.transport.written)
    assert sent.startswith(b"POST /api/generate HTTP/1.1\r\nhost: 127.0.0.1:11435\r\n")
    assert sent.endswith(b"\r\n\r\n{}")
    assert ctx.balancer.table.inflight(0) == 1
    body = b"6\r\nhello\n\r\n0\r\n\r\n"
    backend.data_received(HEAD + body[:4])
    backend.data_received(body[4:])
    assert bytes(client.transport.written) == HEAD + body
    assert ctx.balancer.table.inflight(0) == 0
    assert client.exchange is None and ctx.balancer.backends[0].pool.take() is backend


def test_head_and_body_read_together_leave_in_one_write(wired):
    ctx, client, backend = wired
    writes = []
    client.transport.write = writes.append
    client.data_received(REQ)
    whole = HEAD + b"6\r\nhello\n\r\n0\r\n\r\n"
    backend.data_received(whole)
    # One write, and the read buffer itself: the head went out unchanged.
    assert len(writes) == 1 and writes[0] is whole
    assert client.exchange is None and ctx.balancer.table.inflight(0) == 0


def test_rewritten_head_and_first_chunk_leave_in_one_write(wired):
    ctx, client, backend = wired
    writes = []
    client.transport.write = writes.append
    client.data_received(REQ)
    # Keep-Alive is hop-by-hop: the head is rebuilt without it.
    head = HEAD.replace(b"\r\n\r\n", b"\r\nKeep-Alive: timeout=5\r\n\r\n")
    backend.data_received(head + b"6\r\nhello\n\r\n")
    assert len(writes) == 1 and b"keep-alive" not in writes[0].lower()
    assert writes[0].endswith(b"\r\n\r\n6\r\nhello\n\r\n")
    backend.data_received(b"0\r\n\r\n")
    assert len(writes) == 2 and client.exchange is None


def test_slow_client_pauses_backend_reading(wired):
    ctx, client, backend = wired
    client.data_received(REQ)
    backend.data_received(HEAD)
    client.pause_writing()  # the client's buffer went over the high-water mark
    assert backend.transport.read_paused and backend.gate.reasons == PEER_SLOW
    client.pause_writing()  # idempotent
    client.resume_writing()
    assert not backend.transport.read_paused


def test_slow_backend_upload_pauses_client_reading(wired):
    ctx, client, backend = wired
    client.data_received(REQ)
    backend.pause_writing()  # the request body is not draining upstream
    assert client.transport.read_paused
    backend.resume_writing()
    assert not client.transport.read_paused


def test_pause_carries_over_when_a_backend_is_attached_later(wired):
    ctx, client, backend = wired
    client.pause_writing()
    client.data_received(REQ)
    assert backend.transport.read_paused  # attached while the client was already slow


def test_pipelined_request_waits_and_reading_resumes_after(wired):
    ctx, client, backend = wired
    second = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"
    client.data_received(REQ)
    client.data_received(second)  # arrives while the first is in flight
    assert client.transport.read_paused and client.gate.reasons == PIPELINE
    backend.data_received(HEAD + b"0\r\n\r\n")
    # The first response ended; the buffered second request went upstream at
    # once, on the same (parked, then reused) connection, and reading stays
    # paused until that one is answered too.
    assert backend.transport.written.endswith(b"GET /api/version HTTP/1.1\r\nhost: 127.0.0.1:11435\r\n"
                                              b"x-forwarded-for: 127.0.0.1\r\nx-forwarded-host: x\r\n\r\n")
    assert client.transport.read_paused
    backend.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
    assert not client.transport.read_paused
    assert client.transport.written.endswith(b"\r\n\r\n{}")


def test_client_gone_aborts_backend_and_releases(wired):
    ctx, client, backend = wired
    client.data_received(REQ)
    backend.data_received(HEAD + b"6\r\nhello\n\r\n")
    client.connection_lost(ConnectionResetError())
    assert backend.transport.aborted
    assert ctx.balancer.table.inflight(0) == 0
    backend.connection_lost(None)  # the abort's echo changes nothing
    assert ctx.balancer.table.inflight(0) == 0


def test_read_gate_keeps_reasons_apart():
    t = MockTransport()
    gate = ReadGate(t)
    gate.pause(PEER_SLOW)
    gate.pause(PIPELINE)
    gate.resume(PEER_SLOW)
    assert t.read_paused  # still paused for the other reason
    gate.resume(PEER_SLOW)  # idempotent
    gate.resume(PIPELINE)
    assert not t.read_paused and not gate.paused
