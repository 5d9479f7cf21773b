"""A minimal Ollama stand-in on raw uvloop sockets: the backend of `bench overhead --backend raw`.

Not olb-sim.  olb-sim follows Ollama's scheduler and API in detail, and was
written by the same hands as olb, so a figure measured only against it could
flatter olb by accident (how it frames and paces its writes, say).  This mock
does nothing but write bytes in the patterns a real runner produces, the way
an independent benchmark would write it:

    each NDJSON token is its own chunk and its own transport.write()
    --burst N     back to back: N tokens, then a yield to the event loop
                  (loop.call_soon), then the next N (default 8)
    --token-interval S  paced: one token every S seconds (loop.call_later)
    --ttft S      wait S before the first token

It answers what a balancer in front of Ollama asks: GET /api/version,
/api/tags and /api/ps (one model, loaded), HEAD and GET /, and POST
/api/generate and /api/chat (streamed unless "stream": false; tokens from
options.num_predict, default 16).  Anything else is a 404 with Ollama's
{"error": ...} body.  HTTP/1.1 keep-alive (closed after a request with
Connection: close, or HTTP/1.0), Content-Length request bodies.

    python -m bench.rawmock --count 2 --burst 8      # prints http://127.0.0.1:PORT per instance
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

MODEL = "llama3.2:latest"
DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"
DETAILS = {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
           "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}
CREATED = b"2026-12-02T12:00:00.000000000Z"

_TAGS = json.dumps({"models": [{"name": MODEL, "model": MODEL, "modified_at": "2026-12-01T10:00:00Z",
                                "size": 2019393189, "digest": DIGEST, "details": DETAILS}]}).encode()
_PS = json.dumps({"models": [{"name": MODEL, "model": MODEL, "size": 3400000000, "digest": DIGEST,
                              "details": DETAILS, "expires_at": "2099-01-01T00:00:00Z",
                              "size_vram": 3400000000, "context_length": 4096}]}).encode()
_VERSION = b'{"version":"0.12.6"}'
_ROOT = b"Ollama is running"
_JSON = b"application/json; charset=utf-8"
#: GET (and HEAD) path -> (body, content type).
_GETS = {"/": (_ROOT, b"text/plain; charset=utf-8"), "/api/version": (_VERSION, _JSON),
         "/api/tags": (_TAGS, _JSON), "/api/ps": (_PS, _JSON)}


def _reply(status: int, body: bytes, ctype: bytes = _JSON,
           head_only: bool = False) -> bytes:
    reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}[status]
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nDate: Wed, 02 Dec 2026 12:00:00 GMT\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, reason, ctype, len(body)))
    return head if head_only else head + body


class Stream:
    """One streamed answer: tokens written by loop callbacks, one write() per chunk."""

    __slots__ = ("conn", "left", "sent", "prefix", "chat", "eval_count")

    def __init__(self, conn: MockConn, tokens: int, chat: bool):
        self.conn = conn
        self.left = tokens
        self.sent = 0
        self.chat = chat
        self.eval_count = tokens
        if chat:
            self.prefix = (b'{"model":"llama3.2","created_at":"' + CREATED
                           + b'","message":{"role":"assistant","content":"')
        else:
            self.prefix = b'{"model":"llama3.2","created_at":"' + CREATED + b'","response":"'

    def step(self) -> None:
        conn = self.conn
        if conn.transport is None or conn.stream is not self:
            return
        if conn.paused:
            conn.blocked = True  # resume_writing calls step again
            return
        write = conn.transport.write
        n = 1 if conn.server.interval > 0 else conn.server.burst
        tail = b'"},"done":false}\n' if self.chat else b'","done":false}\n'
        while n and self.left:
            line = b"%s tok%d%s" % (self.prefix, self.sent, tail)
            write(b"%x\r\n%s\r\n" % (len(line), line))
            self.sent += 1
            self.left -= 1
            n -= 1
        if self.left:
            if conn.server.interval > 0:
                conn.server.loop.call_later(conn.server.interval, self.step)
            else:
                conn.server.loop.call_soon(self.step)
            return
        done = (b'{"model":"llama3.2","created_at":"' + CREATED
                + (b'","message":{"role":"assistant","content":""}' if self.chat else b'","response":""')
                + b',"done":true,"done_reason":"stop","total_duration":1000000,"load_duration":1000,'
                  b'"prompt_eval_count":8,"prompt_eval_duration":1000,"eval_count":%d,'
                  b'"eval_duration":1000000}\n' % self.eval_count)
        write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
        conn.stream = None
        if conn.close_after:
            conn.transport.close()
        else:
            conn.serve()  # a pipelined request, if any


class MockConn(asyncio.Protocol):
    """One client connection: requests in order, one at a time (HTTP/1.1 keep-alive)."""

    def __init__(self, server: MockServer):
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.stream: Stream | None = None
        self.paused = False
        self.blocked = False
        self.close_after = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.stream = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.blocked and self.stream is not None:
            self.blocked = False
            self.stream.step()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.serve()

    def serve(self) -> None:
        while self.stream is None and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            length = 0
            close = head[0].endswith("HTTP/1.0")
            for h in head[1:]:
                name, _, value = h.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    close = value.strip().lower() == "close"
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            method, _, rest = head[0].partition(" ")
            self.handle(method, rest.rpartition(" ")[0], body)
            if close:
                # Go's net/http closes after answering a request that asks it to.
                self.close_after = True
                if self.stream is None:
                    self.transport.close()
                return

    def handle(self, method: str, path: str, body: bytes) -> None:
        write = self.transport.write
        if method in ("GET", "HEAD"):
            answer = _GETS.get(path)
            if answer is None:
                write(_reply(404, b'{"error":"404 page not found"}', head_only=method == "HEAD"))
            else:
                write(_reply(200, *answer, head_only=method == "HEAD"))
            return
        if method != "POST" or path not in ("/api/generate", "/api/chat"):
            write(_reply(404, b'{"error":"404 page not found"}'))
            return
        try:
            req = json.loads(body)
            tokens = int((req.get("options") or {}).get("num_predict", 16))
        except (ValueError, TypeError, AttributeError):
            write(_reply(400, b'{"error":"invalid request body"}'))
            return
        chat = path == "/api/chat"
        if req.get("stream", True) is False:
            text = " ".join(f"tok{i}" for i in range(tokens))
            # In Go's field order (api/types.go GenerateResponse, ChatResponse with Metrics), as
            # Ollama writes it.
            out = {"model": "llama3.2", "created_at": CREATED.decode()}
            out["message" if chat else "response"] = {"role": "assistant", "content": text} if chat else text
            out.update(done=True, done_reason="stop", total_duration=1000000, load_duration=1000,
                       prompt_eval_count=8, prompt_eval_duration=1000, eval_count=tokens, eval_duration=1000000)
            write(_reply(200, json.dumps(out, separators=(",", ":")).encode()))
            return
        write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
              b"Date: Wed, 02 Dec 2026 12:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.stream = Stream(self, max(tokens, 0), chat)
        if self.server.ttft > 0:
            self.server.loop.call_later(self.server.ttft, self.stream.step)
        else:
            self.stream.step()


class MockServer:
    def __init__(self, loop, burst: int, interval: float, ttft: float):
        self.loop = loop
        self.burst = burst
        self.interval = interval
        self.ttft = ttft


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    server = MockServer(loop, args.burst, args.token_interval, args.ttft)
    servers = []
    for _ in range(args.count):
        s = await loop.create_server(lambda: MockConn(server), args.host, args.port, backlog=4096)
        servers.append(s)
        host, port = s.sockets[0].getsockname()[:2]
        print(f"http://{host}:{port}", flush=True)
    await asyncio.Event().wait()


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.rawmock", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--count", type=int, default=1, help="instances (listeners) in this process")
    p.add_argument("--burst", type=int, default=8, help="tokens written back to back between yields")
    p.add_argument("--token-interval", type=float, default=0.0, help="seconds between tokens; 0: bursts")
    p.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    args = p.parse_args(argv)
    if args.count < 1 or args.burst < 1 or args.token_interval < 0 or args.ttft < 0:
        p.error("--count and --burst must be >= 1, --token-interval and --ttft >= 0")
    import uvloop

    try:
        uvloop.run(main(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli())
