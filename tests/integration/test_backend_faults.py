"""A backend's health is its own: what a client or this machine does never
counts against it, and a faulty backend's answer reaches the client in the
best shape the bytes already sent allow (issue 14, items 3, 4, 5, 6, 8, 9;
docs/operations.md, "Failures and retries").

Each test drives one rule over real sockets against hand-driven backends
(test_failure_paths.ScriptedBackend), and fails when its fix is removed.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys

import h11
import orjson

from olb.server import start_proxy

from harness import RawClient, fetch, proxy_config, read_response, run, until
from test_cli import olb_env, read_line_matching
from test_failure_paths import ScriptedBackend, answer

STREAM = {"model": "llama3.2", "prompt": "x"}
PROBE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\nOllama is running"
CHUNKED_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")


def chunk(doc) -> bytes:
    line = orjson.dumps(doc) + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


def token(i: int, pad: int = 0) -> bytes:
    return chunk({"model": "llama3.2", "response": str(i) + " " * pad, "done": False})


def probes(backend) -> int:
    return sum(1 for _, r in backend.requests if r.target == "/")


def test_client_that_stops_reading_is_no_backend_silence(loop):
    """Item 3: a client that stops reading makes olb pause the backend's
    read; that pause is not the backend's silence. The client that resumes
    after several OLB_IDLE_TIMEOUTs gets the whole stream with no error
    line, and the backend is neither probed nor marked down."""
    tokens = 256  # 256 x 64 KiB: far more than the sockets and olb's buffers hold

    async def handler(conn, req):
        if req.target == "/":
            return PROBE_ANSWER
        conn.writer.write(CHUNKED_HEAD)
        for i in range(tokens):
            conn.writer.write(token(i, pad=64 * 1024))
            await conn.writer.drain()  # blocks while olb does not read
        conn.writer.write(chunk({"model": "llama3.2", "response": "", "done": True}) + b"0\r\n\r\n")
        return b""

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, eject_after=1,
                                               first_byte_timeout=5, idle_timeout=0.2))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", proxy.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(orjson.dumps(STREAM)), orjson.dumps(STREAM)))
            await until(lambda: proxy.ctx.clients)
            client = next(iter(proxy.ctx.clients))
            await until(lambda: client.exchange is not None and client.exchange.conn is not None
                        and client.exchange.conn.gate.paused)
            # The client reads nothing for five idle timeouts (what is under
            # test is a timer that must not fire: nothing announces it).
            await asyncio.sleep(1.0)
            resp = await asyncio.wait_for(read_response(reader), 20)
            return resp, probes(backend), proxy.balancer.backends[0].up, proxy.balancer.table.inflight(0)
        finally:
            writer.close()
            await proxy.close()
            await backend.close()

    resp, probed, up, inflight = run(loop, main())
    lines = resp.lines()
    assert not any("error" in line for line in lines)
    assert len(lines) == tokens + 1 and lines[-1]["done"]
    assert probed == 0
    assert up and inflight == 0


def test_idle_timeout_applies_from_the_first_byte(loop):
    """Item 4: a stream that stalls after two tokens ends after
    OLB_IDLE_TIMEOUT of silence, not when OLB_FIRST_BYTE_TIMEOUT (a minute
    here, longer than the test waits) has passed."""

    async def handler(conn, req):
        if req.target == "/":
            return PROBE_ANSWER
        conn.writer.write(CHUNKED_HEAD + token(0) + token(1))
        await conn.reader.read()  # silent until olb closes the connection
        conn.closed_by_peer = True
        return None

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0,
                                               first_byte_timeout=60, idle_timeout=0.2))
        try:
            resp = await fetch(proxy.port, "POST", "/api/generate", STREAM, timeout=10)
            await until(lambda: backend.conns[0].closed_by_peer)
            return resp, proxy.balancer.backends[0].up, proxy.balancer.table.inflight(0)
        finally:
            await proxy.close()
            await backend.close()

    resp, up, inflight = run(loop, main())
    lines = resp.lines()
    assert [line.get("response") for line in lines[:2]] == ["0", "1"]
    assert "OLB_IDLE_TIMEOUT" in lines[-1]["error"]
    assert up and inflight == 0  # the backend answered its probe


class Exhausted:
    """This process out of file descriptors: the soft RLIMIT_NOFILE lowered
    to what is open, and every free descriptor below it taken."""

    def __enter__(self):
        self.limit = resource.getrlimit(resource.RLIMIT_NOFILE)
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, self.limit[1]))
        self.taken = []
        try:
            for _ in range(highest + 1):  # bounded: at most every number below the limit
                self.taken.append(os.dup(0))
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        for fd in self.taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limit)


def test_out_of_file_descriptors_is_not_the_backends_fault(loop):
    """Item 5: with olb out of descriptors, a request gets 503 with
    Retry-After and the backend stays up, with no last_error; a probe
    olb cannot send marks nothing down either. Once descriptors are free
    the same client is served."""

    async def handler(conn, req):
        return PROBE_ANSWER if req.target == "/" else answer()

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, eject_after=1, retries=2))
        client = await RawClient.connect(proxy.port)
        admin = await RawClient.connect(proxy.admin_port)  # opened while descriptors remain
        try:
            with Exhausted():
                refused = await client.request("POST", "/api/generate", {**STREAM, "stream": False})
                probed = await proxy.balancer.check(0, "a request timed out")
                status = await admin.request("GET", "/olb/status")
            served = await client.request("POST", "/api/generate", {**STREAM, "stream": False})
            return refused, probed, status, served, proxy.balancer.backends[0].up
        finally:
            client.close()
            admin.close()
            await proxy.close()
            await backend.close()

    refused, probed, status, served, up = run(loop, main())
    assert refused.status == 503 and refused.headers.get("retry-after") == "1"
    assert "EMFILE" in refused.json()["error"]
    assert probed is None
    row = status.json()["backends"][0]
    assert row["healthy"] and row["last_error"] is None
    assert up
    assert served.status == 200


def test_start_up_raises_the_soft_descriptor_limit(tmp_path):
    """Item 5: olb-fast started with a soft RLIMIT_NOFILE below the hard
    one runs with the hard one (nginx's worker_rlimit_nofile)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    proc = subprocess.Popen([sys.executable, "-m", "olb"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, preexec_fn=lower,
                            env=olb_env(OLB_LISTEN="127.0.0.1:0", OLB_BACKENDS="http://127.0.0.1:9",
                                        OLB_HEALTH_INTERVAL="0", OLB_MODELS_INTERVAL="0"))
    try:
        read_line_matching(proc, r"listening on")
        with open(f"/proc/{proc.pid}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files")).split()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
    assert int(row[3]) == hard


def test_oversized_backend_head_read_whole_is_refused(loop):
    """Item 6: a 60 KiB response head that arrives in one read gets the
    client 502, as the same head in pieces does, instead of being forwarded."""

    async def handler(conn, req):
        filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100) for i in range(550))
        return b"HTTP/1.1 200 OK\r\n" + filler + b"Content-Length: 2\r\n\r\n{}"

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0, retries=0))
        try:
            return await fetch(proxy.port, "POST", "/api/generate", {**STREAM, "stream": False})
        finally:
            await proxy.close()
            await backend.close()

    resp = run(loop, main())
    assert resp.status == 502
    assert "larger than 16 KiB" in resp.json()["error"]


def test_malformed_chunk_after_whole_chunks_ends_with_error_line(loop):
    """Item 8: a backend whose chunked body turns malformed after whole
    chunks: what was forwarded ended between chunks, so the client's stream
    ends with Ollama's in-band error line and a clean chunked end, and the
    client connection serves its next request."""
    sent = asyncio.Event()

    async def handler(conn, req):
        if req.target != "/api/generate":
            return answer()
        conn.writer.write(CHUNKED_HEAD + token(0) + token(1))
        await sent.wait()  # the tokens reached the client: a read of their own
        conn.writer.write(b"zz\r\nnot a chunk\r\n")
        await conn.reader.read()
        return None

    async def main():
        backend = await ScriptedBackend(handler).start()
        proxy = await start_proxy(proxy_config([backend.url], models_interval=0))
        client = await RawClient.connect(proxy.port)
        try:
            client.send("POST", "/api/generate", STREAM)
            first = await asyncio.wait_for(client.reader.readuntil(b'"1"'), 10)
            sent.set()
            rest = await asyncio.wait_for(client.reader.readuntil(b"\r\n0\r\n\r\n"), 10)
            again = await client.request("GET", "/olb/health")  # answered by olb (404 on the data port)
            return first + rest, again
        finally:
            sent.set()
            client.close()
            await proxy.close()
            await backend.close()

    raw, again = run(loop, main())
    # h11 reads it as one whole chunked response: the framing is clean.
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    events = []
    while not events or not isinstance(events[-1], h11.EndOfMessage):
        events.append(conn.next_event())
    body = b"".join(e.data for e in events if isinstance(e, h11.Data))
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [line.get("response") for line in lines[:2]] == ["0", "1"]
    assert "malformed chunked body" in lines[-1]["error"]
    assert again.status == 404  # the connection still serves


def test_backend_closing_mid_head_is_retried_elsewhere(loop):
    """Item 9: a backend that closes its connection halfway through the
    response head sent the client nothing: the request goes to another
    backend and succeeds."""
    seen = []

    async def handler(conn, req):
        seen.append(req.target)
        if len(seen) == 1:
            conn.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: applic")
            await conn.writer.drain()
            return None  # closes mid-head
        return answer()

    async def main():
        backends = [await ScriptedBackend(handler).start() for _ in range(2)]
        proxy = await start_proxy(proxy_config([b.url for b in backends], models_interval=0, retries=1))
        try:
            return await fetch(proxy.port, "POST", "/api/generate", {**STREAM, "stream": False})
        finally:
            await proxy.close()
            for b in backends:
                await b.close()

    resp = run(loop, main())
    assert resp.status == 200, resp.body
    assert seen == ["/api/generate", "/api/generate"]
