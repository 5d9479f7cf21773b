"""The overhead benchmark's backends that are not olb-sim, over real sockets: bench/rawmock.py
(the raw mock: one write per token, bursts or paced) and bench/floor.py (a bare uvloop byte
pipe), each alone and olb in front of the raw mock, as `python -m bench overhead --backend raw`
runs them."""

import asyncio

from bench import floor, rawmock
from olb.server import start_proxy

from harness import RawClient, proxy_config, run

GENERATE = {"model": "llama3.2", "prompt": "hi", "options": {"num_predict": 20}}


async def _mock(burst=8, interval=0.0):
    loop = asyncio.get_running_loop()
    state = rawmock.MockServer(loop, burst, interval, 0.0)
    server = await loop.create_server(lambda: rawmock.MockConn(state), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _floor(port):
    loop = asyncio.get_running_loop()
    backends = iter(lambda: ("127.0.0.1", port), None)  # every client to the one backend
    server = await loop.create_server(lambda: floor._Client(loop, backends), "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _chunks(raw_body: bytes) -> list[bytes]:
    """The chunk payloads of a chunked body, as framed on the wire."""
    out, rest = [], raw_body
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return out


def _check_stream(resp, tokens):
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    chunks = _chunks(resp.raw_body)
    # One NDJSON line per chunk: each token went out in its own write.
    assert len(chunks) == tokens + 1
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in chunks)
    lines = resp.lines()
    assert [x["response"] for x in lines[:-1]] == [f" tok{i}" for i in range(tokens)]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == tokens


def test_raw_mock_answers_what_a_balancer_asks(loop):
    async def main():
        server, port = await _mock()
        client = await RawClient.connect(port)
        try:
            _check_stream(await client.request("POST", "/api/generate", GENERATE), 20)
            # Keep-alive: the same connection serves the rest.
            r = await client.request("GET", "/api/version")
            assert r.status == 200 and r.json()["version"]
            tags = (await client.request("GET", "/api/tags")).json()
            ps = (await client.request("GET", "/api/ps")).json()
            assert tags["models"][0]["name"] == ps["models"][0]["name"] == "llama3.2:latest"
            whole = await client.request("POST", "/api/chat", {**GENERATE, "stream": False})
            assert whole.json()["message"]["content"] == " ".join(f"tok{i}" for i in range(20))
            missing = await client.request("GET", "/api/nothing")
            assert missing.status == 404 and missing.json() == {"error": "404 page not found"}
            bad = await client.request("POST", "/api/generate", b"{not json")
            assert bad.status == 400 and "error" in bad.json()
            # Connection: close is honoured, as Go's net/http does.
            client.send("GET", "/api/version", headers={"Connection": "close"})
            assert (await client.response("GET")).status == 200
            assert await asyncio.wait_for(client.reader.read(), 5) == b""
        finally:
            client.close()
            server.close()

    run(loop, main())


def test_raw_mock_paced_and_through_the_floor(loop):
    async def main():
        server, port = await _mock(interval=0.002)
        pipe, pipe_port = await _floor(port)
        client = await RawClient.connect(pipe_port)
        try:
            for _ in range(2):  # two streams on one kept-alive pipe
                _check_stream(await client.request("POST", "/api/generate", GENERATE), 20)
        finally:
            client.close()
            pipe.close()
            server.close()

    run(loop, main())


def test_olb_in_front_of_the_raw_mock(loop):
    async def main():
        servers = [await _mock(), await _mock()]
        proxy = await start_proxy(proxy_config([f"http://127.0.0.1:{p}" for _s, p in servers]))
        client = await RawClient.connect(proxy.port)
        try:
            for _ in range(4):
                _check_stream(await client.request("POST", "/api/generate", GENERATE), 20)
            tags = (await client.request("GET", "/api/tags")).json()
            assert [m["name"] for m in tags["models"]] == ["llama3.2:latest"]
        finally:
            client.close()
            await proxy.close()
            for s, _p in servers:
                s.close()

    run(loop, main())

