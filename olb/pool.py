# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Keep-alive connections to one backend.

Opening a TCP connection per request would add a round trip and a socket
per token stream; Ollama (Go net/http) keeps connections open indefinitely,
so idle ones are parked here and reused most-recently-used first (a warm
connection is the least likely to have been closed by the peer).

A connection is only parked after its response ended cleanly with
keep-alive; one that the backend closes while parked removes itself
(BackendSideProtocol.connection_lost calls `discard`).
"""

from __future__ import annotations

import asyncio
import socket


class BackendPool:

    def __init__(self, loop, index: int, host: str, port: int, hostport: bytes,
                 connect_timeout: float, protocol_factory, max_idle: int = 64):
        self.loop = loop
        self.index = index
        self.host = host
        self.port = port
        self.hostport = hostport
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: list = []
        self._factory = protocol_factory
        self.opened = 0

    def take(self):
        """An idle connection to reuse, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
        return None

    async def connect(self):
        """Open a new connection.

        Raises:
            OSError: refused, unreachable, reset.
            asyncio.TimeoutError: no connection within connect_timeout.
        """
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await self.loop.create_connection(
                lambda: self._factory(self), self.host, self.port, family=socket.AF_UNSPEC)
        self.opened += 1
        return protocol

    def put(self, conn) -> None:
        """Park a connection whose last response ended with keep-alive."""
        if len(self._idle) < self.max_idle and conn.reusable():
            self._idle.append(conn)
        else:
            conn.close()

    def discard(self, conn) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
