"""Type stubs for olb._http (compiled HTTP framing: request, upstream and response heads, body ends).

The docstrings in _http.pyx are the reference; these stubs carry the
signatures and a one-line summary each.
"""

from typing import Final, Literal, Protocol

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

def connection_tokens(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """The lower-cased tokens of every Connection field in `headers`."""

class _UpstreamRequest(Protocol):
    """What upstream_head reads of an olb.http.ProxyRequest."""

    method: bytes
    target: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    has_body_framing: bool

def upstream_head(req: _UpstreamRequest, hostport: bytes, client_ip: bytes) -> bytes:
    """The request head olb sends to a backend: Host rewritten, hop-by-hop fields dropped,
    X-Forwarded-For/-Host and Content-Length added."""

def path_of(target: bytes) -> bytes:
    """A request target without its query (the target itself when it has none)."""

def upstream_head_parts(method: bytes, target: bytes, http10: bool, headers: list[tuple[bytes, bytes]],
                        body: bytes, has_body_framing: bool, hostport: bytes, client_ip: bytes,
                        with_body: bool = False) -> bytes:
    """upstream_head from the request's parts (what proxy.py calls); with_body: the body follows the head."""

#: Largest request or response head (16 KiB).
MAX_HEAD: Final[int]
#: ResponseHead.framing values (RFC 9112 section 6.3).
NO_BODY: Final[int]
CHUNKED: Final[int]
LENGTH: Final[int]
UNTIL_CLOSE: Final[int]

class ResponseHead:
    """A backend's response head, as parse_response_head reads it."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    framing: int
    length: int
    keep_alive: bool
    hop_by_hop: bool
    content_type: bytes
    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        framing: int,
        length: int,
        keep_alive: bool,
        hop_by_hop: bool,
        content_type: bytes,
    ) -> None: ...

def parse_response_head(buf: Buffer, head_request: bool) -> tuple[ResponseHead, int] | None:
    """(ResponseHead, head length), or None while the head is incomplete.

    Raises olb.errors.BackendProtocolError on a malformed or oversized head.
    """

def contains(data: Buffer, needle: bytes) -> bool:
    """Whether `needle` occurs in `data`: `needle in data` without CPython's detour through int."""
