# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Sans-IO HTTP for the proxy: bytes in, requests and response heads out.

Rules for this module: no sockets, no transports, no event loop. The IO shell
(proxy.py) feeds bytes in and writes the bytes that come out.

Theory of operation
-------------------
Client side: h11 is the parser of record, in a server-role
`h11.Connection`, but it costs ~50 us of CPU per request head (half of
what olb spent on a small request). So RequestReader first tries
`olb._http.parse_request_head`, compiled, which reads only the plain case
(CRLF line ends, one Host, at most one Content-Length, no Transfer-Encoding,
no Expect, no obs-fold) in ~1 us and declines everything else; a declined
request, and every error answer, is h11's. The fast parser accepts nothing
h11 would read differently: tests/unit/test_http_head.py holds it to h11 on
real clients' heads and on random mutations of them.

The body is read whole before a backend is chosen: Ollama request bodies are
small JSON (megabytes with images), and a complete body is what lets us retry
on another backend before the first response byte. The one exception is
`POST /api/blobs/sha256:...` (a model file, gigabytes): its request is handed
out as soon as its head is read, and the exchange pulls the body piece by
piece with `next_body()` (see olb/manage.py), with no OLB_MAX_BODY limit.

Limits (docs/operations.md, "Slow and hostile clients"): a head is measured
here before h11 gets it, so the 16 KiB limit is the same however the head
arrives (h11 checks only an incomplete one); CONNECT, PRI and targets that
are not origin-form are refused, an absolute-form target rewritten; a
folded framing field is refused, and Content-Length with Transfer-Encoding
ends the connection after its response. `waiting` tells the IO shell what a
partial request waits for, so that it can time it (olb/slowclient.py).

Response side: olb is not the origin of proxied responses; it forwards the
backend's bytes unchanged, so it never calls h11 to frame them (h11's Data
payloads are copies, and re-framing would cost CPU per streamed token). When
the response has been forwarded, `finish_response` ends the request cycle
(see its docstring for why no shadow response is replayed through h11).

Backend side: both heads are compiled (olb/_http.pyx), because they cost
CPU on every proxied request: the upstream request head is built by
`upstream_head` in one allocation, and the backend's response head is
parsed by `parse_response_head`, a strict, small parser for the one thing
we need from a trusted peer: status, headers and framing. The Python
originals are the reference in tests/http_reference.py, and
tests/unit/test_http_response_head.py holds the compiled ones to them. The
body's end is found by `olb._http.BodyScanner` without copying.

Hop-by-hop headers (RFC 9110 §7.6.1) are dropped in both directions; the
Host header sent upstream is the backend's own address, because Ollama bound
to 127.0.0.1 answers 403 to a non-local Host.
"""

from __future__ import annotations

import os
import re

import h11
import orjson

# Compiled (olb/_http.pyx), and re-exported (the `as`): the rest of olb and
# the tests import them from here. MAX_HEAD: the largest request or response head.
from ._http import CHUNKED as CHUNKED
from ._http import LENGTH as LENGTH
from ._http import MAX_HEAD as MAX_HEAD
from ._http import NO_BODY as NO_BODY
from ._http import UNTIL_CLOSE as UNTIL_CLOSE
from ._http import ResponseHead as ResponseHead
from ._http import connection_tokens, parse_request_head, path_of
from ._http import parse_response_head as parse_response_head
from ._http import upstream_head as upstream_head
from ._http import upstream_head_parts as upstream_head_parts
from .errors import BadRequest, PayloadTooLarge

NEED_DATA = h11.NEED_DATA
PAUSED = h11.PAUSED


class _Closed:
    """Sentinel: the client closed its side and no request is pending."""

    def __repr__(self) -> str:
        return "CLOSED"


CLOSED = _Closed()

# RFC 9110 §7.6.1 hop-by-hop fields, plus Proxy-Connection (sent by old
# clients). Upstream, olb._http.upstream_head also drops Host and
# Content-Length (rewritten), Expect (olb answers it itself: the body is
# already complete when the request goes upstream) and Proxy-Authorization.
_DROP_DOWNSTREAM = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"trailer", b"upgrade"})

_REASONS = {
    400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed",
    408: b"Request Timeout", 413: b"Payload Too Large", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    502: b"Bad Gateway", 503: b"Service Unavailable", 504: b"Gateway Timeout",
    200: b"OK", 201: b"Created", 411: b"Length Required",
}

#: POST to these paths streams its body (RequestReader.next_body): blob uploads.
STREAMED_BODY_PREFIX = b"/api/blobs/"
#: RequestReader.next_body(): the streamed body is complete.
END = h11.EndOfMessage()


def _items(headers) -> list[tuple[bytes, bytes]]:
    """h11's Headers as a plain list of (lower-case name, value).

    h11.Headers is a Sequence whose iteration goes through __getitem__ per
    item (~0.6 us each); reading its backing list once is ~20x cheaper. The
    attribute is h11's (stable since 0.10); the fallback keeps us correct if
    it ever moves.
    """
    full = getattr(headers, "_full_items", None)
    if full is None:
        return list(headers)
    return [(name, value) for _, name, value in full]


class ProxyRequest:
    """A complete client request, as read by RequestReader."""


    def __init__(self, method: bytes, target: bytes, http_version: bytes, headers: list,
                 body: bytes, keep_alive: bool, has_body_framing: bool, streamed: bool = False):
        self.method = method
        self.target = target
        #: The target without its query (read several times a request: kept, not a property).
        self.path = path_of(target)
        self.http_version = http_version
        self.headers = headers  # [(lower-case name, value)] as h11 gives them
        self.body = body
        self.keep_alive = keep_alive
        self.has_body_framing = has_body_framing
        #: The body is not in `body`: read it with RequestReader.next_body().
        self.streamed = streamed

    def header(self, name: bytes) -> bytes | None:
        for pair in self.headers:  # (a typed tuple, when compiled: no unpacking)
            if pair[0] == name:
                return pair[1]
        return None


class RequestReader:
    """The client side of one connection: requests in, in order.

    Call `receive(data)` with what the socket read (b"" at EOF), then
    `next_request()` until it returns NEED_DATA, PAUSED or CLOSED. After each
    call, `take_output()` has bytes to write when `output` is not empty (only
    an interim `100 Continue` today: the caller looks at `output` first, so
    the usual request costs no call for it).

    Two parsers, one at a time (see "Theory of operation" above):

        FAST  -- bytes gather in _buf; olb._http.parse_request_head reads
          |      the plain case.  A request it cannot read whole ("declined")
          |      moves, with everything buffered, to h11:
          v
        H11   -- an h11.Connection in the server role owns the bytes until
                 the response to that request is finished; finish_response
                 then hands what h11 holds back to FAST.

    In both, a request is handed out only once its body is complete, and the
    next one (pipelined) only after finish_response: PAUSED in between. A
    blob upload (POST under STREAMED_BODY_PREFIX) always goes to H11 and is
    handed out at its head, `streamed` set; its body then comes from
    `next_body()`, and `streaming` is true until the body has ended.
    """


    def __init__(self, max_body: int, max_head: int = MAX_HEAD):
        self._conn: h11.Connection | None = None  # None: FAST mode
        self._max_body = max_body
        self._max_head = max_head
        self._head: h11.Request | None = None
        self._headers: list = []
        self._chunks: list[bytes] = []
        self._size = 0
        self.output = b""
        self._buf: bytes | bytearray = b""  # FAST: what the client sent, unparsed
        self._scanned = 0   # FAST: how far the search for the head's end got
        self._eof = False   # FAST: the client closed its sending side
        self._busy = False  # FAST: a request was handed out, its response is pending
        self.streaming = False  # H11: a streamed body is being handed out by next_body()
        self._target = b""  # H11: the request's target in origin form
        self._close = False  # H11: the request must end its connection (framing)
        #: What the last NEED_DATA waits for: IDLE (a request to begin), HEAD
        #: (the rest of a head) or BODY (the rest of a body, `body_bytes` of
        #: it read). The IO shell times HEAD and BODY (olb/slowclient.py).
        self.waiting = IDLE
        self.body_bytes = 0

    def receive(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            conn.receive_data(data)
        elif not data:
            self._eof = True
        elif not self._buf:
            self._buf = data  # the usual case: a whole request in one read, no copy
        elif type(self._buf) is bytearray:
            self._buf += data
        else:
            self._buf = bytearray(self._buf)
            self._buf += data

    def buffered(self) -> bool:
        """Is there something for next_request to read (bytes, or the client's EOF)?
        When not, it would only answer NEED_DATA, and its caller may skip it."""
        return self._conn is not None or bool(self._buf) or self._eof

    def take_output(self) -> bytes:
        out, self.output = self.output, b""
        return out

    def next_request(self):
        """Advance the parser.

        Returns:
            a ProxyRequest when one is complete; NEED_DATA; PAUSED (a pipelined
            request waits until the current response is finished); or CLOSED.

        Raises:
            BadRequest: malformed HTTP (status 400, or 431 for an oversized head).
            PayloadTooLarge: the body is over the limit (announced or counted).
        """
        if self._conn is not None:
            return PAUSED if self.streaming else self._next_h11()
        if self._busy:
            return PAUSED
        buf = self._buf
        if not buf:
            self.waiting = IDLE
            return CLOSED if self._eof else NEED_DATA
        parsed = parse_request_head(buf, self._max_head, self._scanned)
        if parsed is None:
            if self._eof:
                return self._to_h11()  # h11 words the "incomplete request" error
            self._scanned = len(buf)
            self.waiting = HEAD
            return NEED_DATA
        if parsed is False:
            return self._declined(buf)
        method, target, version, headers, head_len, length, keep_alive = parsed
        if target[0] != 0x2F or method == b"CONNECT" or method == b"PRI":  # (_REFUSED_METHODS, as C compares)
            target, headers = _origin_form(method, target, headers)
        if method == b"POST" and target.startswith(STREAMED_BODY_PREFIX):
            return self._to_h11()
        if length > self._max_body:
            raise PayloadTooLarge(self._too_large())
        end = head_len + (length if length > 0 else 0)
        if len(buf) < end:
            if self._eof:
                return self._to_h11()
            # The body is still on its way (httpx, and so the ollama and
            # openai clients, write head and body separately). The head is
            # parsed again when it is complete: ~1 us.
            self.waiting = BODY
            self.body_bytes = len(buf) - head_len
            return NEED_DATA
        # One copy: a bytes slice is one, a bytearray's is taken through a
        # memoryview (its slice would be a bytearray, then a second copy).
        if length <= 0:
            body = b""
        elif type(buf) is bytes:
            body = buf[head_len:end]
        else:
            body = bytes(memoryview(buf)[head_len:end])
        self._buf = bytes(buf[end:]) if end < len(buf) else b""
        self._scanned = 0
        self._busy = True
        self.waiting = IDLE
        return ProxyRequest(method, target, version, headers, body, keep_alive, length >= 0)

    def _declined(self, buf):
        """The fast parser declined: hand the request to h11 once its head is whole.

        h11 enforces max_incomplete_event_size only while a head is
        incomplete: a longer head that arrives in one read, or completes in
        one, it would read. So the head is measured here, the same however
        its bytes arrive, and h11 is given it only complete (or at EOF, or
        when its first byte already shows it is not a request line: h11
        answers those at once).
        """
        head_len = _head_length(buf, self._max_head)
        if head_len > self._max_head or (head_len < 0 and len(buf) >= self._max_head):
            raise BadRequest(f"request head is larger than the limit of {self._max_head} bytes", 431)
        if head_len < 0 and not self._eof and buf[0] > 0x20:
            self.waiting = HEAD
            return NEED_DATA
        if head_len > 0 and _FOLDED_FRAMING.search(buf, 0, head_len) is not None:
            # RFC 9112 §5.2 lets a server unfold obs-fold; h11 does, but a
            # folded framing field is read differently by different parsers
            # (request smuggling), so it is refused (nginx does the same).
            raise BadRequest("obsolete line folding in a Transfer-Encoding or Content-Length field")
        return self._to_h11()

    def _to_h11(self):
        """Hand everything buffered to h11, which parses this request whole."""
        conn = self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._max_head)
        self._head = None
        buf, self._buf = self._buf, b""
        self._scanned = 0
        if buf:
            conn.receive_data(bytes(buf))
        if self._eof:
            conn.receive_data(b"")
        return self._next_h11()

    def _next_h11(self):
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadRequest(str(exc) or "malformed request", exc.error_status_hint) from None
            cls = type(event)
            if cls is h11.Data:
                self._size += len(event.data)
                if self._size > self._max_body:
                    raise PayloadTooLarge(self._too_large())
                self._chunks.append(event.data)
            elif cls is h11.Request:
                self._head = event
                self._headers = headers = _items(event.headers)
                self._target, headers = _origin_form(event.method, event.target, headers)
                self._headers = headers
                # Both framings: h11 reads the body as chunked, but another
                # parser on the path may have read the Content-Length, so the
                # connection ends after this response (RFC 9112 §6.1).
                self._close = (any(n == b"transfer-encoding" for n, _ in headers)
                               and any(n == b"content-length" for n, _ in headers))
                self._chunks = []
                self._size = 0
                length = _content_length(headers)
                streamed = event.method == b"POST" and event.target.startswith(STREAMED_BODY_PREFIX)
                if length is not None and length > self._max_body and not streamed:
                    raise PayloadTooLarge(self._too_large())
                if conn.client_is_waiting_for_100_continue:
                    # curl sends Expect: 100-continue for bodies over 1 MiB and waits
                    # for this before sending the body (RFC 9110 §10.1.1).
                    self.output += conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                if streamed:
                    self.streaming = True
                    self.waiting = IDLE
                    self.body_bytes = 0
                    keep_alive = (event.http_version == b"1.1" and not self._close
                                  and b"close" not in connection_tokens(headers))
                    framing = any(n == b"content-length" or n == b"transfer-encoding" for n, _ in headers)
                    return ProxyRequest(event.method, self._target, event.http_version, headers,
                                        b"", keep_alive, framing, streamed=True)
            elif cls is h11.EndOfMessage:
                head = self._head
                chunks = self._chunks
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._chunks = []
                headers = self._headers
                keep_alive = (head.http_version == b"1.1" and not self._close
                              and b"close" not in connection_tokens(headers))
                framing = any(n == b"content-length" or n == b"transfer-encoding" for n, _ in headers)
                self.waiting = IDLE
                return ProxyRequest(head.method, self._target, head.http_version, headers,
                                    body, keep_alive, framing)
            elif event is h11.NEED_DATA or event is h11.PAUSED:
                if self._head is None:
                    self.waiting = HEAD
                else:
                    self.waiting = BODY
                    self.body_bytes = self._size
                return event
            elif cls is h11.ConnectionClosed:
                return CLOSED
            # h11 yields nothing else to a server.

    def next_body(self):
        """The next piece of a streamed request body (see `streaming`).

        Returns:
            bytes (a piece, never empty), END (the body is complete), or
            NEED_DATA (feed more with `receive`).

        Raises:
            BadRequest: malformed framing, or the client closed mid-body.
        """
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self.streaming = False
                raise BadRequest(str(exc) or "malformed request body", exc.error_status_hint) from None
            cls = type(event)
            if cls is h11.Data:
                if event.data:
                    self.body_bytes += len(event.data)
                    return bytes(event.data)
            elif cls is h11.EndOfMessage:
                self.streaming = False
                return END
            elif event is h11.NEED_DATA:
                return NEED_DATA
            else:  # ConnectionClosed mid-body; h11 raises for that, this is belt and braces
                self.streaming = False
                raise BadRequest("the client closed the connection before the body ended")

    def _too_large(self) -> str:
        return f"request body is larger than the limit of {self._max_body} bytes (OLB_MAX_BODY)"

    def finish_response(self, status: int, closing: bool) -> bool:
        """Tell the reader a response has been written in full.

        olb forwards the backend's response bytes itself, so h11 never framed
        them and its server-side state still says SEND_RESPONSE. Replaying a
        shadow response through h11 just to advance it costs ~30 us a request;
        instead, once the request has been read whole (h11's their_state is
        DONE, which dispatching required), the cycle is over and the bytes
        pipelined behind it go back to the FAST buffer.

        Args:
            status: the final status code that was forwarded (a 101 would
                switch protocols; olb never forwards one).
            closing: the response carried Connection: close, or must end the connection.

        Returns:
            True when the connection may carry another request; False when it
            must be closed.
        """
        conn = self._conn
        if conn is None:
            if closing or not self._busy:
                return False
            self._busy = False
            return True
        if closing or conn.their_state is not h11.DONE:
            return False
        data, closed = conn.trailing_data
        self._conn = None
        self._buf = bytes(data)
        self._scanned = 0
        self._eof = closed
        self._busy = False
        return True


#: RequestReader.waiting: what a NEED_DATA waits for.
IDLE = 0
HEAD = 1
BODY = 2

#: Methods olb refuses whatever their target: a tunnel (RFC 9110 §9.3.6) is
#: not a proxy's to open for a client of Ollama's API, and PRI is the HTTP/2
#: connection preface (RFC 9113 §3.4) read as HTTP/1.
_REFUSED_METHODS = frozenset({b"CONNECT", b"PRI"})

#: A Transfer-Encoding or Content-Length field followed by a continuation
#: line (obs-fold, RFC 9112 §5.2). The head ends at the first empty line, so
#: the search is bounded by its length.
_FOLDED_FRAMING = re.compile(rb"\n(?:transfer-encoding|content-length)[ \t]*:[^\n]*\n[ \t]", re.IGNORECASE)

#: The end of a head as h11 finds it (ReceiveBuffer.maybe_extract_lines): a
#: line end followed by an empty line, bare LFs allowed.
_HEAD_END = re.compile(rb"\n\r?\n")


def _head_length(buf, max_head: int) -> int:
    """The length of the head at the start of `buf` (through its empty line), or -1 if not complete.

    Looks a little past max_head, so that a head just over the limit is
    measured rather than reported incomplete.
    """
    match = _HEAD_END.search(buf, 0, max_head + 3)
    return -1 if match is None else match.end()


def _origin_form(method: bytes, target: bytes, headers: list) -> tuple[bytes, list]:
    """The request's target in origin form (RFC 9112 §3.2.1), and its headers.

    An absolute-form target (`http://host/path`) is rewritten as a proxy
    would, to its path and query, and its authority becomes the Host (RFC
    9112 §3.2.2: the Host field is then ignored; Go's net/http readRequest
    sets req.Host from the URL too, and Ollama's allowedHostsMiddleware reads
    that). Every other form, and CONNECT and PRI, is refused with 400.

    Raises:
        BadRequest: the method or the target form is one olb does not serve.
    """
    if method in _REFUSED_METHODS:
        raise BadRequest(f"method {method.decode('ascii', 'replace')} is not supported")
    if target[:1] == b"/":
        return target, headers
    scheme, sep, rest = target.partition(b"://")
    if sep and scheme.lower() in (b"http", b"https"):
        cut = len(rest)
        for mark in (b"/", b"?", b"#"):
            at = rest.find(mark)
            if 0 <= at < cut:
                cut = at
        authority, path = rest[:cut], rest[cut:]
        if authority and b"@" not in authority and path[:1] != b"#":
            if path[:1] != b"/":
                path = b"/" + path
            headers = [(n, authority if n == b"host" else v) for n, v in headers]
            if not any(n == b"host" for n, _ in headers):
                headers.append((b"host", authority))
            return path, headers
    raise BadRequest("the request target must be a path (origin-form) or an absolute http URL")


def _content_length(headers) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return None


# --- backend response head ------------------------------------------------------


def downstream_head(head: ResponseHead, raw: bytes, closing: bool) -> bytes:
    """The response head olb sends to its client.

    `raw` is the head exactly as the backend sent it; when it carries no
    hop-by-hop field and the connection stays open it is forwarded as is.
    """
    if not head.hop_by_hop and not closing and raw[7:8] == b"1":
        return raw
    parts = [b"HTTP/1.1 %d " % head.status, head.reason, b"\r\n"]
    for name, value in head.headers:
        if name not in _DROP_DOWNSTREAM:
            parts += (name, b": ", value, b"\r\n")
    if closing:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


# --- responses olb originates ----------------------------------------------------


def is_openai_path(target: bytes) -> bool:
    return target.startswith(b"/v1/")


#: anthropic.NewError's error types by status (anthropic/anthropic.go).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 503: "overloaded_error",
                    529: "overloaded_error"}


def error_body(target: bytes, message: str, status: int) -> bytes:
    """Ollama's error shape, or the shape Ollama itself uses under /v1/:
    Anthropic's for /v1/messages (anthropic.NewError), else OpenAI's
    (openai.NewError)."""
    if target.startswith(b"/v1/messages") and target[12:13] in (b"", b"?", b"/"):
        return orjson.dumps({"type": "error",
                             "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
                             "request_id": "req_" + os.urandom(12).hex()})
    if is_openai_path(target):
        kind = "invalid_request_error" if status == 400 else ("not_found_error" if status == 404 else "api_error")
        return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}})
    return orjson.dumps({"error": message})


def simple_response(status: int, body: bytes, *, content_type: bytes = b"application/json; charset=utf-8",
                    closing: bool = False, extra: list[tuple[bytes, bytes]] | None = None,
                    head_only: bool = False) -> bytes:
    parts = [b"HTTP/1.1 %d " % status, _REASONS.get(status, b"Unknown"), b"\r\n",
             b"content-type: ", content_type, b"\r\n",
             b"content-length: %d\r\n" % len(body)]
    for name, value in extra or ():
        parts += (name, b": ", value, b"\r\n")
    if closing:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def error_response(target: bytes, status: int, message: str, *, closing: bool = False,
                   retry_after: int | None = None, head_only: bool = False) -> bytes:
    extra = [(b"retry-after", b"%d" % retry_after)] if retry_after is not None else None
    return simple_response(status, error_body(target, message, status), closing=closing,
                           extra=extra, head_only=head_only)


def stream_error_tail(head: ResponseHead, message: str) -> bytes:
    """The last chunks of a chunked stream that failed mid-way.

    Ollama's own mid-stream failure is a final `{"error": "..."}` line with the
    status left at 200 (routes.go streamResponse); in SSE the OpenAI client
    raises APIError on an event whose JSON has an `error` key.
    """
    if head.content_type.startswith(b"text/event-stream"):
        line = b"data: " + orjson.dumps({"error": {"message": message, "type": "api_error",
                                                   "param": None, "code": None}}) + b"\n\n"
    else:
        line = orjson.dumps({"error": message}) + b"\n"
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line)
