"""The pure-Python reference of what olb/_http.pyx compiles on the backend side.

upstream_head (with _connection_tokens and _drop_named) and
parse_response_head (with ResponseHead) as olb/http.py had them before they
moved to olb/_http.pyx, verbatim: tests/unit/test_http_response_head.py holds
the compiled versions to these, output for output and error message for
error message, and bench/test_bench_core.py times both.
"""

from __future__ import annotations

from olb.errors import BackendProtocolError

MAX_HEAD = 16 * 1024

_DROP_UPSTREAM = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
    b"proxy-authorization",
})
_DROP_DOWNSTREAM = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"trailer", b"upgrade"})


def _connection_tokens(headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def upstream_head(req, hostport: bytes, client_ip: bytes) -> bytes:
    """The request head olb sends to a backend (the body follows unchanged).

    HTTP/1.0 clients are forwarded as HTTP/1.0, so the backend answers
    without chunked framing (which such a client cannot read) and closes.
    """
    drop = _DROP_UPSTREAM
    tokens = None
    parts = [req.method, b" ", req.target,
             b" HTTP/1.0\r\nhost: " if req.http_version == b"1.0" else b" HTTP/1.1\r\nhost: ",
             hostport, b"\r\n"]
    forwarded_for = None
    orig_host = None
    for name, value in req.headers:
        if name in drop:
            if name == b"connection":
                tokens = _connection_tokens(req.headers)
            elif name == b"host":
                orig_host = value
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value
            continue
        parts += (name, b": ", value, b"\r\n")
    if tokens:
        # Fields named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
        parts = _drop_named(parts, tokens)
    parts += (b"x-forwarded-for: ",
              forwarded_for + b", " + client_ip if forwarded_for else client_ip, b"\r\n")
    if orig_host is not None:
        parts += (b"x-forwarded-host: ", orig_host, b"\r\n")
    if req.body or req.has_body_framing:
        parts += (b"content-length: ", b"%d" % len(req.body), b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _drop_named(parts: list, tokens: set) -> list:
    # parts after the first six items are (name, ": ", value, CRLF) quads.
    out = parts[:6]
    for i in range(6, len(parts), 4):
        if parts[i] not in tokens:
            out += parts[i:i + 4]
    return out


#: Body framing of a response, from RFC 9112 §6.3.
NO_BODY = 0
CHUNKED = 1
LENGTH = 2
UNTIL_CLOSE = 3


class ResponseHead:
    __slots__ = ("status", "reason", "headers", "framing", "length", "keep_alive", "hop_by_hop", "content_type")

    def __init__(self, status, reason, headers, framing, length, keep_alive, hop_by_hop, content_type):
        self.status = status
        self.reason = reason
        self.headers = headers
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.hop_by_hop = hop_by_hop
        self.content_type = content_type


def parse_response_head(buf: bytes, head_request: bool):
    """Parse a backend's response head from the start of `buf`.

    Args:
        buf: bytes read so far from the backend for this response.
        head_request: the request was HEAD (the response has no body whatever it says).

    Returns:
        (ResponseHead, head_length) or None when the head is not complete yet.

    Raises:
        BackendProtocolError: the bytes are not an HTTP/1.x response head.
    """
    end = buf.find(b"\r\n\r\n")
    # One limit however the bytes arrive: a head read whole is held to it too.
    if (len(buf) if end < 0 else end + 4) > MAX_HEAD:
        raise BackendProtocolError("backend sent a response head larger than 16 KiB")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    status_line = lines[0]
    if status_line[:7] != b"HTTP/1." or len(status_line) < 12 or status_line[8:9] != b" ":
        raise BackendProtocolError(f"backend sent a malformed status line: {status_line[:64]!r}")
    code = status_line[9:12]
    if not code.isdigit():
        raise BackendProtocolError(f"backend sent a malformed status line: {status_line[:64]!r}")
    status = int(code)
    http11 = status_line[7:8] == b"1"
    headers = []
    chunked = False
    length = -1
    close = not http11
    hop = False
    content_type = b""
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise BackendProtocolError(f"backend sent a malformed header line: {line[:64]!r}")
        name = name.lower()
        value = value.strip(b" \t")
        headers.append((name, value))
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise BackendProtocolError(f"backend sent a bad Content-Length: {value[:32]!r}")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
            if not chunked:
                raise BackendProtocolError(f"backend sent an unsupported Transfer-Encoding: {value[:32]!r}")
        elif name == b"content-type":
            content_type = value
        if name in _DROP_DOWNSTREAM:
            hop = True
            if name == b"connection":
                tokens = {t.strip().lower() for t in value.split(b",")}
                if b"close" in tokens:
                    close = True
                elif b"keep-alive" in tokens and not http11:
                    close = False
    if status < 200 or status in (204, 304) or head_request:
        framing = NO_BODY
    elif chunked:
        framing = CHUNKED
    elif length >= 0:
        framing = LENGTH
    else:
        framing = UNTIL_CLOSE
        close = True
    return ResponseHead(status, status_line[13:], headers, framing, length, not close, hop, content_type), end + 4

