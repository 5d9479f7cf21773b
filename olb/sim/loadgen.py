"""A small, bounded load generator for olb-sim (or anything that speaks HTTP/1.1).

    python -m olb.sim.loadgen --url http://127.0.0.1:11435 --mode small -c 32 -n 20000
    python -m olb.sim.loadgen --url http://127.0.0.1:11435 --mode stream -c 64 -n 200 --tokens 500

Raw asyncio protocols on uvloop with keep-alive connections, so the client
costs little per request.  `small` sends GET /api/version and counts
responses/s; `stream` posts /api/generate and counts NDJSON lines/s.  Every
run is bounded by -n (requests in total) and --timeout (seconds), and only
talks to the URL given.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from urllib.parse import urlsplit

import orjson
import uvloop


class _Client(asyncio.Protocol):
    """One keep-alive connection issuing one request at a time."""

    def __init__(self, request: bytes, stream: bool, state):
        self.request = request
        self.stream = stream
        self.state = state
        self.buf = bytearray()
        self.scanned = 0
        self.transport = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self._next()

    def _next(self):
        st = self.state
        if st["sent"] >= st["limit"] or time.perf_counter() > st["deadline"]:
            self.transport.close()
            return
        st["sent"] += 1
        self.transport.write(self.request)

    def data_received(self, data):
        self.buf += data
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            if b"transfer-encoding: chunked" in head:
                # Scan only what is new: a long stream arrives in many reads.
                term = buf.find(b"\r\n0\r\n\r\n", max(end, self.scanned - 8))
                if term < 0:
                    self.scanned = len(buf)
                    return
                self.scanned = 0
                body = bytes(buf[end + 4:term + 2])
                del buf[:term + 7]
                # Each chunk is "<hex>\r\n<line>\n\r\n": count line ends.
                self.state["lines"] += body.count(b"\n\r\n")
            else:
                i = head.find(b"content-length:")
                n = int(head[i + 15:head.find(b"\r\n", i) if head.find(b"\r\n", i) > 0 else None])
                if len(buf) < end + 4 + n:
                    return
                del buf[:end + 4 + n]
            self.state["done"] += 1
            self._next()

    def connection_lost(self, exc):
        if not self.closed.done():
            self.closed.set_result(None)


async def run(url: str, mode: str, concurrency: int, total: int, tokens: int, timeout: float) -> dict:
    parts = urlsplit(url)
    host, port = parts.hostname, parts.port or 80
    if mode == "small":
        request = f"GET /api/version HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    else:
        body = orjson.dumps({"model": "llama3.2", "prompt": "load test",
                             "options": {"num_predict": tokens}})
        request = (f"POST /api/generate HTTP/1.1\r\nHost: {host}:{port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    state = {"sent": 0, "done": 0, "lines": 0, "limit": total, "deadline": t0 + timeout}
    clients = []
    for _ in range(concurrency):
        _, proto = await loop.create_connection(lambda: _Client(request, mode == "stream", state), host, port)  # type: ignore[arg-type]  # None: getaddrinfo's loopback
        clients.append(proto)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), timeout + 5)
    elapsed = time.perf_counter() - t0
    return {"mode": mode, "requests": state["done"], "seconds": round(elapsed, 3),
            "requests_per_s": round(state["done"] / elapsed), "lines": state["lines"],
            "lines_per_s": round(state["lines"] / elapsed)}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m olb.sim.loadgen")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=("small", "stream"), default="small")
    p.add_argument("-c", "--concurrency", type=int, default=32)
    p.add_argument("-n", "--requests", type=int, default=10000)
    p.add_argument("--tokens", type=int, default=200, help="num_predict per stream")
    p.add_argument("--timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    print(orjson.dumps(uvloop.run(run(a.url, a.mode, a.concurrency, a.requests, a.tokens, a.timeout))).decode())


if __name__ == "__main__":
    main()
