"""Slow and hostile clients over real sockets (docs/operations.md, "Slow and hostile clients").

Each test fails when its defence is removed: a dripped head or body is
answered 408 long before the keep-alive timeout would close it (the timer
used to restart on every byte); a head over 16 KiB gets 431 however it
arrives; both framings close the connection; the forms of request olb does
not serve are refused; and the body bytes a worker holds are capped, which a
subprocess's own peak RSS shows.
"""

import asyncio
import hashlib
import pathlib
import socket
import time

import pytest

from olb.sim import SimConfig, start_sim

from harness import RawClient, fetch, read_response, request_bytes, run, start_cluster, until
from test_cli import read_line_matching, start_olb, stop

FAST = SimConfig(token_rate=0, ttft=0, seed=7, deterministic_time=True)
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
GENERATE_BYTES = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'


async def read_all(reader, timeout: float) -> bytes:
    """Everything the server sends until it closes (bounded in time)."""
    out = bytearray()
    while True:
        data = await asyncio.wait_for(reader.read(65536), timeout)
        if not data:
            return bytes(out)
        out += data


async def drip(writer, reader, payload: bytes, interval: float) -> bytes | None:
    """Send `payload` one byte at a time; return what the server answered, or None if it never did."""
    for i in range(len(payload)):
        try:
            writer.write(payload[i:i + 1])
            await writer.drain()
        except ConnectionError:
            break
        try:
            return await asyncio.wait_for(reader.read(65536), interval) or None
        except TimeoutError:
            continue
    try:
        return await asyncio.wait_for(reader.read(65536), 1) or None
    except (TimeoutError, ConnectionError):
        return None


def test_dripped_heads_get_408_however_often_a_byte_comes(loop):
    """20 connections send a head a byte every 50 ms; each gets 408 at OLB_HEADER_TIMEOUT, though a
    byte came well within OLB_KEEPALIVE_TIMEOUT every time, and a healthy client is served meanwhile."""
    head = b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Pad: a\r\n" * 10

    async def one(port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        try:
            answer = await drip(writer, reader, head, 0.05)
        finally:
            writer.close()
        return answer, time.monotonic() - started

    async def main():
        cluster = await start_cluster(1, FAST, keepalive_timeout=1.0, header_timeout=0.6)
        try:
            dripping = [asyncio.ensure_future(one(cluster.port)) for _ in range(20)]
            healthy = await fetch(cluster.port, "POST", "/api/generate", GENERATE)
            results = await asyncio.gather(*dripping)
        finally:
            await cluster.close()
        assert healthy.status == 200
        for answer, took in results:
            assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"request head" in answer and b"OLB_HEADER_TIMEOUT" in answer
            assert took < 5.0  # the drip itself would run 7 s (146 bytes x 50 ms)

    run(loop, main(), timeout=60)


def test_dripped_body_gets_408(loop):
    """A body dripped at 20 bytes a second is ended at OLB_BODY_TIMEOUT (+ its bytes / OLB_BODY_MIN_RATE)."""
    body = b'{"model": "llama3.2", "prompt": "' + b"x" * 200 + b'", "stream": false}'
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    async def main():
        cluster = await start_cluster(1, FAST, keepalive_timeout=1.0, body_timeout=0.5, body_min_rate=1024)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(head)
            started = time.monotonic()
            answer = await drip(writer, reader, body, 0.05)
            took = time.monotonic() - started
            writer.close()
            # A body that arrives at once is still served on that worker.
            healthy = await fetch(cluster.port, "POST", "/api/generate", GENERATE)
        finally:
            await cluster.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        assert b"body" in answer and b"connection: close" in answer
        assert took < 6.0  # the drip would run 12 s
        assert healthy.status == 200

    run(loop, main(), timeout=60)


def test_body_sent_above_the_minimum_rate_is_served_past_the_body_timeout(loop):
    """Each 2 KiB earns two more seconds at OLB_BODY_MIN_RATE=1K, so a body that takes 1.5 s against
    OLB_BODY_TIMEOUT=0.5 is read whole and served."""
    body = b'{"model": "llama3.2", "stream": false, "prompt": "' + b"x" * (10 * 1024) + b'"}'
    head = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))

    async def main():
        cluster = await start_cluster(1, FAST, body_timeout=0.5, body_min_rate=1024)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(head)
            step = -(-len(body) // 5)
            started = time.monotonic()
            for i in range(0, len(body), step):
                writer.write(body[i:i + step])
                await asyncio.sleep(0.3)  # the pace under test, not a wait for readiness
            answer = await asyncio.wait_for(read_response(reader), 10)
            took = time.monotonic() - started
            writer.close()
        finally:
            await cluster.close()
        assert took > 1.0  # longer than OLB_BODY_TIMEOUT alone allows
        assert answer.status == 200 and answer.json()["done"]

    run(loop, main(), timeout=60)


def test_dripped_blob_upload_gets_408_and_ends_its_backend_uploads(loop):
    """A streamed body (POST /api/blobs/...) is timed by the same rule while its exchange runs."""
    data = bytes(range(256)) * 2
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def main():
        cluster = await start_cluster(2, FAST, keepalive_timeout=1.0, body_timeout=0.5, body_min_rate=1024)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(b"POST /api/blobs/%s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                         % (digest.encode(), len(data)))
            started = time.monotonic()
            answer = await drip(writer, reader, data[:200], 0.05)
            took = time.monotonic() - started
            writer.close()
            await until(lambda: not cluster.proxy.ctx.clients)
            blob = await fetch(cluster.port, "HEAD", f"/api/blobs/{digest}")
        finally:
            await cluster.close()
        assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
        assert took < 5.0  # the drip would run 10 s
        assert blob.status == 404  # no backend kept a partial blob

    run(loop, main(), timeout=60)


@pytest.mark.parametrize("size", [17_000, 40_000, 65_000])
@pytest.mark.parametrize("writes", [1, 20])
def test_head_limit_is_the_same_however_the_head_arrives(loop, size, writes):
    pad = b"X-Pad: " + b"a" * (size - 120) + b"\r\n"
    head = b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + pad + b"\r\n"
    assert len(head) > 16 * 1024

    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            step = -(-len(head) // writes)
            for i in range(0, len(head), step):
                writer.write(head[i:i + step])
                try:
                    await writer.drain()
                except ConnectionError:
                    break
            answer = await read_all(reader, 10)
            writer.close()
            # Just under the limit is read, in one write.
            small = b"X-Pad: " + b"a" * (16 * 1024 - 200) + b"\r\n"
            client = await RawClient.connect(cluster.port)
            client.writer.write(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n" + small + b"\r\n")
            ok = await client.response("GET")
            client.close()
        finally:
            await cluster.close()
        assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        assert ok.status == 200

    run(loop, main())


def test_content_length_and_transfer_encoding_close_after_the_response(loop):
    """RFC 9112 §6.1: the request is answered, the one smuggled after its `0` chunk is not."""
    smuggled = (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (len(b'{"model": "llama3.2", "prompt": "hi", "stream": false}'),
                                          b'{"model": "llama3.2", "prompt": "hi", "stream": false}')
                + b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")

    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(smuggled)
            first = await asyncio.wait_for(read_response(reader), 10)
            rest = await read_all(reader, 10)
            writer.close()
        finally:
            await cluster.close()
        assert first.status == 200 and first.json()["done"]
        assert first.headers.get("connection") == "close"
        assert rest == b""  # the second request was never executed

    run(loop, main())


@pytest.mark.parametrize("head,status", [
    # h11 unfolds both and would run the request (a 200 from the backend).
    (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding:\r\n chunked\r\n\r\n"
     b"%x\r\n%s\r\n0\r\n\r\n" % (len(GENERATE_BYTES), GENERATE_BYTES), 400),
    (b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length:\r\n %d\r\n\r\n%s"
     % (len(GENERATE_BYTES), GENERATE_BYTES), 400),
    (b"PRI * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"CONNECT 127.0.0.1:11434 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"OPTIONS * HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET 127.0.0.1/api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET ftp://127.0.0.1/api/version HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET http://127.0.0.1/api/version HTTP/1.1\r\nHost: elsewhere\r\n\r\n", 200),
], ids=["folded-te", "folded-cl", "pri", "connect", "asterisk", "no-slash", "ftp-absolute", "http-absolute"])
def test_forms_olb_does_not_serve_are_refused(loop, head, status):
    async def main():
        cluster = await start_cluster(1, FAST)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(head)
            answer = await asyncio.wait_for(read_response(reader, "GET"), 10)
            writer.close()
        finally:
            await cluster.close()
        assert answer.status == status, answer.raw[:300]
        if status == 200:
            assert "version" in answer.json()  # the absolute-form target was rewritten to its path

    run(loop, main())


def test_held_bodies_are_capped_and_given_back(loop):
    """Over OLB_MAX_BODY_HELD a request still being read gets 503; once the stalled upload is gone,
    the same request is served."""
    big = 700 * 1024

    async def main():
        cluster = await start_cluster(1, FAST, max_body=4 << 20, max_body_held=1 << 20)
        bodies = cluster.proxy.ctx.bodies
        try:
            _, stalled_w = await asyncio.open_connection("127.0.0.1", cluster.port)
            stalled_w.write(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                            % (2 << 20) + b"x" * big)
            await stalled_w.drain()
            await until(lambda: bodies.held >= big)
            body = b'{"model": "llama3.2", "prompt": "' + b"y" * (600 * 1024) + b'", "stream": false}'
            refused = await fetch(cluster.port, "POST", "/api/generate", body)
            stalled_w.close()
            await until(lambda: bodies.held == 0)
            served = await fetch(cluster.port, "POST", "/api/generate", body)
        finally:
            await cluster.close()
        assert refused.status == 503 and "OLB_MAX_BODY_HELD" in refused.json()["error"]
        assert refused.headers.get("retry-after") == "1"
        assert served.status == 200

    run(loop, main())


def _peak_rss(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_stalled_uploads_keep_rss_under_64mb_plus_max_body(loop_thread):
    """8 uploads stall at 12 MiB each (96 MiB in all) against OLB_MAX_BODY=16M: olb's peak RSS stays
    under 64 MB + 16 MiB, because the worker refuses what it cannot hold."""
    max_body = 16 << 20
    sim = loop_thread.run(start_sim(FAST))
    proc = start_olb(["--listen", "127.0.0.1:0"], OLB_BACKENDS=sim.url, OLB_MAX_BODY="16M",
                     OLB_HEALTH_INTERVAL="0", OLB_GPU_POLL="0", OLB_MODELS_INTERVAL="0")
    socks = []
    try:
        port = int(read_line_matching(proc, r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        chunk = b"z" * (1 << 20)
        for _ in range(8):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(s)
            try:
                s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
                          % (max_body - 1))
                for _ in range(12):
                    s.sendall(chunk)
            except OSError:
                pass  # refused with 503 and closed: what the cap is for
        # Every byte sent has been read (or refused) once /api/version answers on a new connection.
        probe = socket.create_connection(("127.0.0.1", port), timeout=10)
        probe.sendall(request_bytes("GET", "/api/version"))
        assert probe.recv(65536).startswith(b"HTTP/1.1 200 ")
        probe.close()
        peak = _peak_rss(proc.pid)
        assert peak < 64_000_000 + max_body, f"peak RSS {peak / 1e6:.1f} MB"
    finally:
        for s in socks:
            s.close()
        assert stop(proc) == 0
        loop_thread.run(sim.close())
