"""Helpers for integration tests: a proxy in front of simulated Ollama
instances, all on 127.0.0.1 port 0, and a small raw HTTP client.

Everything here returns once sockets listen; nothing sleeps for readiness.
"""

from __future__ import annotations

import asyncio
import dataclasses

import h11
import orjson

from olb import config as config_mod
from olb.server import start_proxy
from olb.sim import SimConfig, start_sim


def run(loop, coro, timeout: float = 30):
    """Drive `coro` to its end on the test's loop, bounded in time."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


async def until(cond, timeout: float = 5.0, interval: float = 0.002) -> None:
    """Wait until `cond()` is true, looking every `interval` seconds; fail after `timeout`.

    For what no event announces (a counter, a queue length): a bounded poll,
    never a sleep for a guessed time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() >= deadline:
            raise AssertionError(f"condition not reached within {timeout}s: {cond}")
        await asyncio.sleep(interval)


def proxy_config(urls, **overrides) -> config_mod.Config:
    """A Config for tests: port 0 (the admin listener's too), no background probes unless asked."""
    backend_opts = overrides.pop("backend_opts", None)
    entries = [u + (backend_opts[i] if backend_opts else "") for i, u in enumerate(urls)]
    base = config_mod.Config(listen_host="127.0.0.1", listen_port=0, health_interval=0, gpu_poll=0,
                             admin_listen=("127.0.0.1", 0))
    backends = config_mod.parse_backends(",".join(entries), overrides.get("max_inflight", base.max_inflight))
    return dataclasses.replace(base, backends=backends, **overrides)


class Cluster:
    def __init__(self, proxy, sims):
        self.proxy = proxy
        self.sims = sims

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def admin_port(self) -> int:
        """The admin listener's port: /olb/* is served there, not on the data port."""
        return self.proxy.admin_port

    async def close(self) -> None:
        await self.proxy.close()
        for sim in self.sims:
            await sim.close()


async def start_cluster(n: int = 2, sim_config: SimConfig | None = None, sim_configs=None,
                        **overrides) -> Cluster:
    configs = sim_configs or [sim_config or SimConfig(token_rate=0, ttft=0, seed=7)] * n
    sims = [await start_sim(c) for c in configs]
    proxy = await start_proxy(proxy_config([s.url for s in sims], **overrides))
    return Cluster(proxy, sims)


@dataclasses.dataclass
class Response:
    status: int
    headers: dict
    body: bytes        # de-framed body
    raw_body: bytes    # the body bytes as they came on the wire (chunk framing included)
    raw: bytes         # everything, head included

    def json(self):
        return orjson.loads(self.body)

    def lines(self):
        return [orjson.loads(line) for line in self.body.splitlines() if line]


class RawClient:
    """One keep-alive HTTP/1.1 connection that records the exact bytes it reads."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    def send(self, method: str, path: str, body=None, headers=None, http10: bool = False) -> None:
        self.writer.write(request_bytes(method, path, body, headers, http10))

    async def response(self, method: str = "POST", timeout: float = 10) -> Response:
        return await asyncio.wait_for(read_response(self.reader, method), timeout)

    async def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10) -> Response:
        self.send(method, path, body, headers)
        return await self.response(method, timeout)

    def close(self) -> None:
        self.writer.close()


def request_bytes(method, path, body=None, headers=None, http10=False) -> bytes:
    if body is not None and not isinstance(body, (bytes, bytearray)):
        body = orjson.dumps(body)
    lines = [f"{method} {path} HTTP/{'1.0' if http10 else '1.1'}", "Host: 127.0.0.1"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
        if not any(k.lower() == "content-type" for k in (headers or {})):
            lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


async def read_response(reader, method: str = "POST") -> Response:
    """Read one response, using h11 as the oracle for where it ends."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    raw = bytearray()
    body = bytearray()
    head = None
    head_len = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            raw += data
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            head = event
            head_len = bytes(raw).find(b"\r\n\r\n") + 4
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    # Bytes read past this response belong to the next one (pipelining): put
    # them back by handing them to the stream's buffer.
    leftover = conn.trailing_data[0]
    if leftover:
        reader._buffer[:0] = leftover  # asyncio.StreamReader keeps a bytearray
        raw = raw[: len(raw) - len(leftover)]
    headers = {k.decode().lower(): v.decode() for k, v in head.headers}
    return Response(head.status_code, headers, bytes(body), bytes(raw[head_len:]), bytes(raw))


async def fetch(port: int, method: str, path: str, body=None, headers=None, timeout: float = 10) -> Response:
    client = await RawClient.connect(port)
    try:
        return await client.request(method, path, body, headers, timeout)
    finally:
        client.close()
