"""Failure paths over real sockets: each test fails when its code path is removed.

The backends here are hand-driven (ScriptedBackend): a test decides, request
by request, whether a backend answers, holds its answer, stalls mid-stream or
closes the connection, which the simulated Ollama cannot be told to do at a
chosen moment.
"""

from __future__ import annotations

import asyncio
import dataclasses
import mmap

import orjson

from olb import balancer as balancer_mod
from olb._core import shared_size
from olb.balancer import new_table
from olb.server import start_proxy

from harness import RawClient, fetch, proxy_config, run, until


@dataclasses.dataclass
class Conn:
    """One connection a ScriptedBackend accepted."""

    number: int                    # 0 for the first connection, 1 for the next...
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: int = 0              # requests read on it so far
    closed_by_peer: bool = False   # olb closed it (EOF seen by the handler)


@dataclasses.dataclass
class Request:
    method: str
    target: str
    body: bytes


def answer(body: bytes = b'{"ok":true}', status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class ScriptedBackend:
    """An HTTP/1.1 backend on 127.0.0.1:0 whose every answer is `handler(conn, request)`.

    The handler returns the bytes to write (the connection stays open for the
    next request) or None to close the connection without answering; it may
    also write on `conn.writer` itself and wait.
    """

    def __init__(self, handler):
        self.handler = handler
        self.conns: list[Conn] = []
        self.requests: list[tuple[int, Request]] = []  # (connection number, request)
        self._server = None

    async def start(self) -> "ScriptedBackend":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    conn.closed_by_peer = True
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                req = Request(method, target, await reader.readexactly(length) if length else b"")
                conn.requests += 1
                self.requests.append((conn.number, req))
                out = await self.handler(conn, req)
                if out is None:
                    return
                writer.write(out)
        except ConnectionError:
            conn.closed_by_peer = True
        finally:
            writer.close()

    async def close(self) -> None:
        self._server.close()
        for conn in self.conns:
            conn.writer.close()
        await self._server.wait_closed()


GENERATE = {"model": "llama3.2", "prompt": "x", "stream": False}


def test_reused_connection_found_closed_is_retried_on_a_fresh_one(loop):
    """A parked backend connection that the backend closes as olb reuses it
    (an Ollama restarting, a proxy in front of it that drops idle
    connections) never got the request: olb sends it again on a new
    connection to the same backend, without spending a retry (OLB_RETRIES=0
    here, so without that path the request fails with 502)."""

    async def handler(conn, req):
        # Serve the first request of each connection, then close the
        # connection on the next one without answering it.
        return answer() if conn.requests == 1 else None

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, retries=0))
        client = await RawClient.connect(proxy.port)
        try:
            first = await client.request("POST", "/api/generate", GENERATE)
            await until(lambda: proxy.balancer.backends[0].pool.idle_count == 1)
            second = await client.request("POST", "/api/generate", GENERATE)
            return first, second, [n for n, _ in backend.requests], proxy.balancer.backends[0].up
        finally:
            client.close()
            await proxy.close()
            await backend.close()

    first, second, conn_numbers, up = run(loop, main())
    assert (first.status, second.status) == (200, 200)
    # The second request reached the parked connection 0, which closed, then a fresh connection 1.
    assert conn_numbers == [0, 0, 1]
    assert up


def test_idle_timeout_ends_a_stalled_stream(loop):
    """A backend that goes silent in the middle of a stream: after
    OLB_IDLE_TIMEOUT of silence olb ends the client's stream with Ollama's
    in-band error line, closes the backend connection (that stops Ollama's
    work) and frees the slot. A stream whose tokens keep coming runs past
    OLB_FIRST_BYTE_TIMEOUT: that one only bounds the wait for the head."""
    tokens = 8

    def chunk(doc) -> bytes:
        line = orjson.dumps(doc) + b"\n"
        return b"%x\r\n%s\r\n" % (len(line), line)

    async def handler(conn, req):
        if req.target == "/":
            # The probe olb sends after a timeout (Balancer.check): this
            # backend is alive, as a real Ollama would say.
            return b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nOllama is running"
        conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                          b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(tokens):
            if conn.writer.is_closing():  # olb gave up on the stream
                conn.closed_by_peer = True
                return None
            # 0.05 s apart, 10 times less than the idle timeout: a slow
            # generation, not a stalled one.
            conn.writer.write(chunk({"model": "llama3.2", "response": str(i), "done": False}))
            await asyncio.sleep(0.05)
        await conn.reader.read()  # now silent, until olb closes the connection
        conn.closed_by_peer = True
        return None

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0,
                                               first_byte_timeout=0.2, idle_timeout=0.5))
        client = await RawClient.connect(proxy.port)
        try:
            resp = await client.request("POST", "/api/generate", {"model": "llama3.2", "prompt": "x"},
                                        timeout=10)
            await until(lambda: backend.conns[0].closed_by_peer)
            again = await client.request("GET", "/olb/health")
            return resp, again, proxy.balancer.table.inflight(0)
        finally:
            client.close()
            await proxy.close()
            await backend.close()

    resp, again, inflight = run(loop, main())
    assert resp.status == 200
    lines = resp.lines()
    assert [line["response"] for line in lines[:-1]] == [str(i) for i in range(tokens)]
    assert "OLB_IDLE_TIMEOUT" in lines[-1]["error"]
    assert inflight == 0
    # The client connection outlives the failed stream: olb answers the next
    # request itself (/olb/ on the data port: the admin gate's 404).
    assert again.status == 404


def test_keepalive_timeout_closes_idle_clients_only(loop):
    """OLB_KEEPALIVE_TIMEOUT closes a client connection that sits idle; one
    waiting for its response past that time is left alone."""
    release = asyncio.Event()

    async def handler(conn, req):
        if req.target == "/api/chat":
            await release.wait()
        return answer()

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, keepalive_timeout=0.2))
        busy = await RawClient.connect(proxy.port)
        idle = await RawClient.connect(proxy.port)
        try:
            busy.send("POST", "/api/chat", {"model": "llama3.2", "messages": []})
            served = await idle.request("POST", "/api/generate", GENERATE)
            # olb closes the idle connection: end of file, bounded.
            eof = await asyncio.wait_for(idle.reader.read(), 5)
            # By now the busy client has waited longer than the timeout too.
            release.set()
            late = await busy.response(timeout=5)
            busy.close()
            await until(lambda: not proxy.ctx.clients)
            return served, eof, late
        finally:
            release.set()
            busy.close()
            idle.close()
            await proxy.close()
            await backend.close()

    served, eof, late = run(loop, main())
    assert served.status == 200
    assert eof == b""
    assert late.status == 200


def test_queued_request_sees_a_slot_freed_by_another_worker(loop):
    """With several workers the in-flight counts are shared but each queue is
    its worker's own: a slot freed on worker 0 reaches a request queued on
    worker 1 by its queue poll, well before OLB_QUEUE_TIMEOUT."""
    release = asyncio.Event()

    async def handler(conn, req):
        if b"hold" in req.body:
            await release.wait()
        return answer()

    async def main():
        backend = await ScriptedBackend(handler).start()
        cfg = proxy_config([backend.url], models_interval=0, session_bound=0, max_inflight=1,
                           workers=2, queue_timeout=5)
        shared = mmap.mmap(-1, shared_size(1, 2))
        workers = [await start_proxy(cfg, table=new_table(cfg, shared=shared, worker=w, workers=2),
                                     worker=w) for w in range(2)]
        holder = await RawClient.connect(workers[0].port)
        waiter = await RawClient.connect(workers[1].port)
        try:
            holder.send("POST", "/api/generate", {**GENERATE, "prompt": "hold"})
            await until(lambda: len(backend.requests) == 1)
            waiter.send("POST", "/api/generate", GENERATE)
            await until(lambda: len(workers[1].balancer.queue) == 1)
            release.set()  # worker 0 releases the only slot; worker 1 is not told
            held, waited = await holder.response(), await waiter.response(timeout=10)
            return held, waited, workers[1].balancer.rejected
        finally:
            release.set()
            holder.close()
            waiter.close()
            for w in workers:
                await w.close()
            await backend.close()

    held, waited, rejected = run(loop, main())
    assert held.status == 200
    assert waited.status == 200, waited.body
    assert rejected == 0


def test_probe_back_off_grows_to_its_cap(loop, monkeypatch):
    """A backend taken out is probed (GET /) after a delay that doubles with
    each failed probe, up to PROBE_MAX; the probe that succeeds brings it back."""
    monkeypatch.setattr(balancer_mod, "PROBE_FIRST", 0.01)
    monkeypatch.setattr(balancer_mod, "PROBE_MAX", 0.08)
    failing_probes = 5
    seen = []  # (loop time, the back-off delay olb slept before this probe)
    state = {}

    async def handler(conn, req):
        if req.method == "GET" and req.target == "/":
            seen.append((loop.time(), state["backend"].probe_delay))
            if len(seen) <= failing_probes:
                return answer(b"starting", "500 Internal Server Error")
            return answer(b"Ollama is running")
        # Until its probes succeed, a request breaks the connection: with
        # OLB_EJECT_AFTER=1 the first one takes the backend out.
        return answer() if len(seen) > failing_probes else None

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, retries=0, eject_after=1))
        row = state["backend"] = proxy.balancer.backends[0]
        try:
            failed = await fetch(proxy.port, "POST", "/api/generate", GENERATE)
            down_at = loop.time()
            assert not row.up
            await until(lambda: row.up, timeout=10)
            served = await fetch(proxy.port, "POST", "/api/generate", GENERATE)
            return failed, down_at, served
        finally:
            await proxy.close()
            await backend.close()

    failed, down_at, served = run(loop, main())
    assert failed.status == 502
    delays = [delay for _, delay in seen]
    assert delays == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
    # And the probes did wait that long (with room for a timer that fires a
    # millisecond early): 0.30 s in all, where a back-off that never grew
    # would take 0.06 s.
    assert seen[-1][0] - down_at >= 0.8 * sum(delays)
    assert served.status == 200  # back in service
