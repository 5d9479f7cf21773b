"""Type stubs for olb._relay (the compiled per-chunk path of a proxied response).

The docstrings in _relay.pyx are the reference.
"""

from typing import Any, Callable

from ._http import BodyScanner

def monotonic() -> float:
    """Seconds on CLOCK_MONOTONIC: the clock of Relay.last_io."""

class Relay:
    """Base of proxy.BackendSideProtocol: forwards body bytes, finds the body's end."""

    head: Any | None
    scanner: BodyScanner
    forward: Callable[[bytes], object] | None
    last_io: float
    tail1: bytes | None
    tail2: bytes | None
    keep: list[bytes | None] | None
    keep_left: int
    def keep_data(self, data: bytes) -> None:
        """Keep `data` as data_received keeps what it forwards."""
    def data_received(self, data: bytes) -> None: ...
    # Defined by the subclass:
    def _read_head(self, data: bytes) -> None: ...
    def _end(self, data: bytes, end: int) -> None: ...
    def _protocol_error(self, message: str) -> None: ...
