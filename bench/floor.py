"""The floor: the least a uvloop Protocol proxy can do per byte, as a bench target (`floor`).

Each client connection gets its own backend connection (round robin over the
backends) for its lifetime, and bytes go across as they arrive: data_received
-> the other side's transport.write, with pause/resume flow control both
ways.  No HTTP parsing, no balancing per request, no timers: it is not a load
balancer and only serves to measure.  Against it, `python -m bench overhead
--targets ...,floor` shows what olb costs on top of the uvloop Protocol API
itself (one read callback with a new bytes object, one write, per chunk),
and what part of olb's cost that API is.

    python -m bench.floor --listen 127.0.0.1:0 --backends 127.0.0.1:11434,127.0.0.1:11435
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys


class _Side(asyncio.Protocol):
    """One end of the pipe; `peer` is the other end's protocol."""

    def __init__(self):
        self.transport = None
        self.peer: _Side | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.pending.append(data)  # the backend connection is still opening

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _Client(_Side):
    def __init__(self, loop, backends):
        super().__init__()
        self.loop = loop
        self.backend = next(backends)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            _, upstream = await self.loop.create_connection(_Side, *self.backend)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        if self.transport is None:
            upstream.transport.close()
            return
        upstream.peer, self.peer = self, upstream
        for data in self.pending:
            upstream.transport.write(data)
        self.pending = []


async def main(args) -> None:
    loop = asyncio.get_running_loop()
    backends = itertools.cycle([(h, int(p)) for h, p in (b.rsplit(":", 1) for b in args.backends.split(","))])
    host, port = args.listen.rsplit(":", 1)
    server = await loop.create_server(lambda: _Client(loop, backends), host, int(port), backlog=4096)
    h, p = server.sockets[0].getsockname()[:2]
    print(f"floor listening on http://{h}:{p}", flush=True)
    await asyncio.Event().wait()


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("--listen", default="127.0.0.1:0")
    p.add_argument("--backends", required=True, help="host:port,host:port")
    args = p.parse_args(argv)
    import uvloop

    try:
        uvloop.run(main(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli())
