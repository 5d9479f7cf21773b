"""olb.client over real sockets: a scripted HTTP server on 127.0.0.1 port 0, and olb-sim."""

import asyncio
import hashlib

import pytest

from olb.client import BackendClient
from olb.errors import BackendConnectError, BackendProtocolError, BackendTimeout
from olb.sim import SimConfig, start_sim

from harness import run



class Scripted:
    """A server whose handler(reader, writer) is the test's; counts connections."""

    def __init__(self, handler):
        self.handler = handler
        self.connections = 0
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


async def read_request(reader):
    """One request head (and a Content-Length body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None, b""
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def test_request_against_sim_and_keep_alive(loop):
    async def main():
        sim = await start_sim(SimConfig(token_rate=0, ttft=0, seed=7, models=("llama3.2:1b",)))
        client = BackendClient("127.0.0.1", sim.port)
        try:
            first = await client.request("GET", "/api/tags")
            conn = client._idle[-1]
            second = await client.request("GET", "/api/tags")
            assert client._idle[-1] is conn  # the same connection, kept alive
            show = await client.request("POST", "/api/show", body=b'{"model":"nope"}')
            return first, second, show
        finally:
            await client.close()
            await sim.close()

    first, second, show = run(loop, main())
    assert first.status == 200 and first.json() == second.json()
    assert [m["name"] for m in first.json()["models"]] == ["llama3.2:1b"]
    assert show.status == 404 and "error" in show.json()


def test_stale_idle_connection_is_replaced(loop):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(ok(b"{}"))
        await writer.drain()
        # Keep-alive was promised, but the server closes (as Go's IdleTimeout does).

    async def main():
        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port)
        try:
            for _ in range(3):
                resp = await client.request("GET", "/")
                assert resp.status == 200 and resp.body == b"{}"
            return srv.connections
        finally:
            await client.close()
            await srv.close()

    assert run(loop, main()) == 3


def test_streamed_response_chunks_arrive_before_the_end(loop):
    async def main():
        released = asyncio.Event()

        async def handler(reader, writer):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"7\r\nline 1\n\r\n")
            await writer.drain()
            await released.wait()  # the second line only after the client saw the first
            writer.write(b"7\r\nline 2\n\r\n0\r\n\r\n")
            await writer.drain()
            await read_request(reader)

        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port)
        got = []
        try:
            async with client.stream("POST", "/api/pull", body=b'{"model":"x"}') as resp:
                assert resp.status == 200
                async for chunk in resp:
                    got.append(chunk)
                    released.set()
            assert len(client._idle) == 1  # read to the end: kept alive
            return b"".join(got)
        finally:
            await client.close()
            await srv.close()

    assert run(loop, main()) == b"line 1\nline 2\n"


def test_leaving_a_stream_early_closes_the_connection(loop):
    async def main():
        closed = asyncio.Event()

        async def handler(reader, writer):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab\n\r\n")
            await writer.drain()
            await reader.read()  # EOF: olb closed it
            closed.set()

        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port)
        try:
            async with client.stream("GET", "/s") as resp:
                async for chunk in resp:
                    assert chunk == b"ab\n"
                    break
            await closed.wait()
            return client._idle
        finally:
            await client.close()
            await srv.close()

    assert run(loop, main()) == []


def test_streamed_request_body_waits_for_the_reader(loop):
    """A body producer is held back while the server does not read (backpressure)."""
    size, piece = 64 * 1024 * 1024, b"x" * 65536

    async def main():
        produced = 0
        at_gate = []

        async def body():
            nonlocal produced
            while produced < size:
                produced += len(piece)
                yield piece

        async def handler(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            # Not a readiness wait: the server stays deaf for a while, and we
            # record how far the producer got in that time. Writes that did not
            # wait for the socket would have queued all 64 MiB by then.
            await asyncio.sleep(0.5)
            at_gate.append(produced)
            digest = hashlib.sha256()
            left = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while left:
                data = await reader.read(min(left, 1 << 20))
                digest.update(data)
                left -= len(data)
            writer.write(ok(digest.hexdigest().encode()))
            await writer.drain()

        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port, read_timeout=20)
        try:
            resp = await client.request("POST", "/api/blobs/sha256:x", body=body(), content_length=size)
            return resp, at_gate
        finally:
            await client.close()
            await srv.close()

    resp, at_gate = run(loop, main())
    assert resp.status == 200
    assert resp.body == hashlib.sha256(piece * (size // len(piece))).hexdigest().encode()
    # Held back by the kernel's socket buffers (a few MiB), far from the whole body.
    assert at_gate[0] < size // 2


def test_streamed_body_length_must_match(loop):
    async def handler(reader, writer):
        await reader.read()

    async def main():
        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port)

        async def short():
            yield b"abc"

        try:
            with pytest.raises(ValueError, match="ended at 3 of content_length 10"):
                await client.request("POST", "/b", body=short(), content_length=10)
            with pytest.raises(ValueError, match="needs content_length"):
                await client.request("POST", "/b", body=short())
        finally:
            await client.close()
            await srv.close()

    run(loop, main())


def test_idle_read_timeout(loop):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await reader.read()  # then silence

    async def main():
        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port, read_timeout=0.2)
        try:
            with pytest.raises(BackendTimeout, match="sent nothing for 0.2 s"):
                await client.request("GET", "/")
        finally:
            await client.close()
            await srv.close()

    run(loop, main())


def test_connect_refused_is_connect_error(loop):
    async def main():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        client = BackendClient("127.0.0.1", port)
        with pytest.raises(BackendConnectError):
            await client.request("GET", "/")

    run(loop, main())


@pytest.mark.parametrize("response, error", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"a" * 100, "over 50 bytes"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 20000 + b"\r\n\r\n", "head over 16384 bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "closed the connection"),
])
def test_bad_responses(loop, response, error):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(response)
        await writer.drain()

    async def main():
        srv = await Scripted(handler).start()
        client = BackendClient("127.0.0.1", srv.port)
        try:
            with pytest.raises((BackendProtocolError, BackendConnectError), match=error):
                await client.request("GET", "/", max_body=50)
            assert client._idle == []
        finally:
            await client.close()
            await srv.close()

    run(loop, main())
