"""Type stubs for olb._http (compiled HTTP framing: request heads, body ends).

The docstrings in _http.pyx are the reference; these stubs carry the
signatures and a one-line summary each.
"""

from typing import Literal

from typing_extensions import Buffer

RequestHead = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes]], int, int, bool]

def parse_request_head(data: Buffer, max_head: int, search_from: int = 0) -> RequestHead | Literal[False] | None:
    """The plain-case request head at the start of data; None: incomplete; False: let h11 parse it.

    The tuple is (method, target, http_version, headers, head_len,
    content_length or -1, keep_alive).
    """

class BodyScanner:
    """Finds where one HTTP/1.1 response body ends, without copying it."""

    def __init__(self) -> None: ...
    def expect_chunked(self) -> None: ...
    def expect_length(self, n: int) -> None:
        """Content-Length body; n == 0 is done at once; ValueError if n < 0."""

    def expect_close(self) -> None:
        """Body runs until the backend closes the connection."""

    def feed(self, data: Buffer) -> int:
        """-1 if the body goes on, else the offset just past its last byte.

        Raises ValueError on malformed chunked framing, RuntimeError before
        any expect_*().
        """

    @property
    def done(self) -> bool: ...
    @property
    def at_chunk_boundary(self) -> bool:
        """A chunked body is between chunks (a whole chunk may be injected); after a
        feed() that raised, whether the bytes before that piece ended between chunks."""

    @property
    def bytes_seen(self) -> int:
        """Body bytes consumed so far, chunk framing included."""
