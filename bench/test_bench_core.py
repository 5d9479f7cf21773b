"""Micro-benchmarks for olb._core and olb._http, each against a baseline in its group.

    .venv/bin/pytest bench/test_bench_core.py --benchmark-only

Groups:
    acquire+release n=4|64|1024   BackendTable vs a pure-Python selector with
                                  the same policy; one round = PAIRS pairs.
    scan NDJSON ...               BodyScanner.feed vs h11 on a streamed
                                  /api/generate body (200 chunks of ~120 B),
                                  whole in one buffer and one chunk per feed.
    relay 200 NDJSON chunks       olb._relay.Relay.data_received (compiled) vs
                                  the same method in Python, as proxy.py had
                                  it: the per-chunk cost above the syscalls;
                                  `keep`: a chat stream's relay, which also
                                  keeps each chunk for a continuation.
    response head                 olb._http.parse_response_head vs the Python
                                  original (tests/http_reference.py) on
                                  Ollama's head of a streamed /api/chat.
    upstream head                 olb._http.upstream_head vs the Python
                                  original on the ollama Python client's
                                  /api/chat request.
    token counts                  olb._tokens.response_tokens vs the regex
                                  original (tests/tokens_reference.py) on
                                  Ollama's last line of a non-streamed
                                  /api/generate (read once per response).

Per-operation figures: divide the acquire+release means by PAIRS.  Pin the
process to one CPU (taskset -c N ...) for numbers worth quoting.
"""

import random

import h11
import pytest

from olb._core import NO_BACKEND, BackendTable
from olb._http import BodyScanner, parse_response_head, upstream_head
from olb._relay import Relay
from olb._tokens import response_tokens
from olb.http import ProxyRequest
from tests import http_reference, tokens_reference

PAIRS = 100  # acquire+release pairs per timed call: amortises the call overhead
SIZES = [4, 64, 1024]


class PyTable:
    """The least_loaded policy in plain Python (the baseline to beat)."""

    def __init__(self, capacities, seed):
        self.capacity = list(capacities)
        self.denom = [float(c) for c in capacities]
        self.inflight = [0] * len(capacities)
        self.healthy = [True] * len(capacities)
        self.random = random.Random(seed).random

    def set_gpu_load(self, index, util):
        self.denom[index] = self.capacity[index] * max(0.05, 1.0 - util)

    def acquire(self):
        best, best_score, ties = NO_BACKEND, 0.0, 0
        inflight, capacity, denom, healthy = self.inflight, self.capacity, self.denom, self.healthy
        for i in range(len(capacity)):
            count = inflight[i]
            if not healthy[i] or count >= capacity[i]:
                continue
            score = (count + 1) / denom[i]
            if best < 0 or score < best_score:
                best, best_score, ties = i, score, 1
            elif score == best_score:
                ties += 1
                if self.random() * ties < 1.0:
                    best = i
        if best >= 0:
            inflight[best] += 1
        return best

    def release(self, index):
        if self.inflight[index] <= 0:
            raise ValueError(index)
        self.inflight[index] -= 1


def loaded_table(cls, n):
    """A fleet mid-flight: mixed capacities, half the slots busy, a quarter of
    the backends with a GPU reading, one in sixteen down."""
    rng = random.Random(n)
    caps = [rng.randint(2, 8) for _ in range(n)]
    table = cls(caps, seed=n)
    for i in range(n):
        if i % 4 == 1:
            if cls is PyTable:
                table.set_gpu_load(i, rng.random())
            else:
                table.set_gpu_load(i, rng.random(), rng.random())
        if i % 16 == 5:
            if cls is PyTable:
                table.healthy[i] = False
            else:
                table.set_health(i, False)
    for _ in range(sum(caps) // 2):
        table.acquire()
    return table


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", ["olb._core", "python"])
def test_acquire_release(benchmark, n, impl):
    table = loaded_table(BackendTable if impl == "olb._core" else PyTable, n)
    acquire, release = table.acquire, table.release

    def pairs():
        for _ in range(PAIRS):
            release(acquire())

    benchmark.group = f"acquire+release n={n}"
    benchmark.extra_info.update(impl=impl, backends=n, pairs_per_round=PAIRS)
    benchmark(pairs)


# -- the body scanner ----------------------------------------------------------


def ndjson_stream(n_chunks=200):
    """What Ollama streams for /api/generate: one JSON object per chunk."""
    chunks = []
    for i in range(n_chunks):
        line = (b'{"model":"llama3.2","created_at":"2024-06-01T12:00:%02d.%06dZ",'
                b'"response":" tok%d","done":false}\n' % (i % 60, i, i))
        chunks.append(b"%x\r\n%s\r\n" % (len(line), line))
    chunks.append(b"0\r\n\r\n")
    return chunks


CHUNKS = ndjson_stream()
BODY = b"".join(CHUNKS)
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"


def h11_after_head():
    """An h11 client connection that has already parsed the response head."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/api/generate",
                          headers=[("Host", "ollama"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(HEAD)
    assert type(conn.next_event()) is h11.Response
    return conn


def h11_to_end(conn, pieces):
    next_event, EndOfMessage, NEED_DATA = conn.next_event, h11.EndOfMessage, h11.NEED_DATA
    for piece in pieces:
        conn.receive_data(piece)
        while True:
            event = next_event()
            if event is NEED_DATA:
                break
            if type(event) is EndOfMessage:
                return
    raise AssertionError("h11 did not find the end")


@pytest.mark.parametrize("shape", ["one buffer", "chunk per feed"])
@pytest.mark.parametrize("impl", ["olb._http", "h11"])
def test_scan_ndjson(benchmark, impl, shape):
    pieces = [BODY] if shape == "one buffer" else CHUNKS
    benchmark.group = f"scan NDJSON 200x~120 B, {shape}"
    benchmark.extra_info.update(impl=impl, body_bytes=len(BODY), feeds=len(pieces))
    if impl == "olb._http":
        scanner = BodyScanner()
        expect, feed = scanner.expect_chunked, scanner.feed

        def scan():
            expect()
            for piece in pieces:
                end = feed(piece)
            return end

        assert benchmark(scan) == len(pieces[-1])
    else:
        # The head parse is setup, not timed: only the body is compared.
        benchmark.pedantic(h11_to_end, setup=lambda: ((h11_after_head(), pieces), {}),
                           rounds=300, warmup_rounds=10)


# -- the relay: what olb does per streamed chunk ----------------------------------


class PyRelay:
    """The backend protocol's data_received as it was in Python (the baseline)."""

    __slots__ = ("head", "scanner", "forward", "last_io", "loop", "ended")

    def __init__(self, loop, forward):
        self.head, self.scanner, self.forward, self.loop = object(), BodyScanner(), forward, loop
        self.ended = None

    def data_received(self, data):
        if self.head is None:
            return
        self.last_io = self.loop.time()
        try:
            end = self.scanner.feed(data)
        except ValueError:
            return
        if end < 0:
            self.forward(data)
        else:
            self.ended = end


class CRelay(Relay):
    """olb._relay.Relay with the subclass callbacks BackendSideProtocol defines."""

    __slots__ = ("ended",)

    def __init__(self, forward):
        self.head, self.forward, self.ended = object(), forward, None

    def _end(self, data, end):
        self.ended = end


@pytest.mark.parametrize("impl", ["python", "olb._relay", "olb._relay keep"])
def test_relay_stream(benchmark, impl):
    """200 chunks through data_received into a forward that keeps nothing;
    `keep`: a chat stream, whose relay also keeps a reference to each chunk
    for a continuation (olb/resume.py, OLB_RESUME_MAX_BYTES)."""
    import asyncio

    benchmark.group = "relay 200 NDJSON chunks"
    benchmark.extra_info.update(impl=impl, chunks=len(CHUNKS))
    forward = len  # a C callable that keeps nothing, like transport.write's cost floor
    loop = asyncio.new_event_loop()
    relay = PyRelay(loop, forward) if impl == "python" else CRelay(forward)
    scanner, received = relay.scanner, relay.data_received

    keep = impl.endswith("keep")

    def stream():
        scanner.expect_chunked()
        relay.ended = None
        if keep:
            relay.keep, relay.keep_left = [], 512 * 1024
        for chunk in CHUNKS:
            received(chunk)
        return relay.ended

    try:
        assert benchmark(stream) == len(CHUNKS[-1])
    finally:
        loop.close()


# -- the backend side's heads: one of each per proxied request ----------------------


#: What Ollama (Go net/http) answers to a streamed /api/chat.
OLLAMA_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
               b"Date: Sat, 01 Jun 2024 12:00:00 GMT\r\nTransfer-Encoding: chunked\r\n\r\n")

#: The ollama Python client's /api/chat request, as RequestReader hands it out.
CHAT = ProxyRequest(b"POST", b"/api/chat", b"1.1",
                    [(b"host", b"127.0.0.1:11434"), (b"accept-encoding", b"gzip, deflate"),
                     (b"connection", b"keep-alive"), (b"content-length", b"96"),
                     (b"content-type", b"application/json"), (b"accept", b"application/json"),
                     (b"user-agent", b"ollama-python/0.4.7 (x86_64 linux) Python/3.11.7")],
                    b'{"model":"llama3.2","messages":[{"role":"user","content":"Why is the sky blue?"}]}',
                    True, True)


@pytest.mark.parametrize("impl", ["olb._http", "python"])
def test_parse_response_head(benchmark, impl):
    parse = parse_response_head if impl == "olb._http" else http_reference.parse_response_head
    benchmark.group = "response head"
    benchmark.extra_info.update(impl=impl, head_bytes=len(OLLAMA_HEAD))
    head, size = benchmark(parse, OLLAMA_HEAD + b"5\r\n", False)
    assert size == len(OLLAMA_HEAD) and head.framing == http_reference.CHUNKED


@pytest.mark.parametrize("impl", ["olb._http", "python"])
def test_upstream_head(benchmark, impl):
    build = upstream_head if impl == "olb._http" else http_reference.upstream_head
    benchmark.group = "upstream head"
    benchmark.extra_info.update(impl=impl, fields=len(CHAT.headers))
    out = benchmark(build, CHAT, b"127.0.0.1:11435", b"127.0.0.1")
    assert out == http_reference.upstream_head(CHAT, b"127.0.0.1:11435", b"127.0.0.1")


#: Ollama's answer to a non-streamed /api/generate, its Metrics last (api/types.go).
GENERATE_ANSWER = (b'{"model":"llama3.2","created_at":"2026-12-02T10:00:00.000000Z","response":"The sky is blue '
                   b'because of Rayleigh scattering.","done":true,"done_reason":"stop","context":[1,2,3],'
                   b'"total_duration":512000000,"load_duration":1000,"prompt_eval_count":26,'
                   b'"prompt_eval_duration":130000000,"eval_count":298,"eval_duration":4709000000}')


@pytest.mark.parametrize("impl", ["olb._tokens", "python"])
def test_response_tokens(benchmark, impl):
    read = response_tokens if impl == "olb._tokens" else tokens_reference.response_tokens
    benchmark.group = "token counts"
    benchmark.extra_info.update(impl=impl, body_bytes=len(GENERATE_ANSWER))
    assert benchmark(read, None, None, GENERATE_ANSWER) == (26, 298, 4.709)
