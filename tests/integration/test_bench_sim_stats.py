"""bench/scheduling.py reads each simulated instance's GET /sim/stats over HTTP at the end of a
run: a JSON object is kept, an instance without the endpoint (404), with a non-object body or
that does not answer at all is None ("n/a" in the report)."""

import asyncio
import json

from bench import scheduling


async def _serve(answers: dict):
    """A tiny HTTP/1.1 server on 127.0.0.1:0: `answers[path]` = (status line, body bytes)."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        path = head.split(b" ", 2)[1].decode()
        status, body = answers.get(path, ("404 Not Found", b"404 page not found"))
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, "http://127.0.0.1:%d" % server.sockets[0].getsockname()[1]


def test_sim_stats_kept_missing_or_odd(loop):
    stats = {"loads": 4, "unloads": 2, "evictions": 2, "reloads": 1, "eviction_wait_s": 12.5, "pending": 0}

    async def main():
        servers = [await _serve({"/sim/stats": ("200 OK", json.dumps(stats).encode())}),
                   await _serve({}),                                          # an olb.sim without it
                   await _serve({"/sim/stats": ("200 OK", b"[1, 2]")})]       # not an object
        # A port nobody listens on: bound and closed by a server of our own.
        gone, gone_url = await _serve({})
        gone.close()
        await gone.wait_closed()
        try:
            got = await asyncio.gather(*(scheduling.sim_stats(url) for _s, url in servers),
                                       scheduling.sim_stats(gone_url))
        finally:
            for s, _url in servers:
                s.close()
                await s.wait_closed()
        return got

    got = loop.run_until_complete(asyncio.wait_for(main(), 10))
    assert got == [stats, None, None, None]
    figures = scheduling.sim_figures(got[:1] * 2)
    assert (figures["eviction_wait_s"], figures["sim_loads"]) == (25.0, 8)
    assert scheduling.sim_figures(got)["eviction_wait_s"] is None
