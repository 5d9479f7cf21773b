"""olb._http's parse_response_head and upstream_head against their Python originals.

The compiled versions must behave exactly as the Python ones did (kept
verbatim in tests/http_reference.py): for a response head, the same fields
with the same types, or the same exception with the same message; for an
upstream head, the same bytes, or the same exception. Checked on heads as
Ollama's Go net/http writes them, on hand-written edge cases, and on seeded
random mutations of both.
"""

import random
import sys

import pytest

from olb import http
from olb._http import MAX_HEAD, ResponseHead, parse_response_head, upstream_head, upstream_head_parts
from olb.errors import BackendProtocolError
from olb.http import ProxyRequest
from tests import http_reference as ref

DATE = b"Date: Sat, 01 Jun 2024 12:00:00 GMT\r\n"

# Response heads as Ollama (Go net/http, gin) writes them.
OLLAMA_HEADS = [
    # /api/generate and /api/chat streaming: chunked NDJSON
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n" + DATE + b"Transfer-Encoding: chunked\r\n\r\n",
    # stream: false, /api/tags, /api/show: Content-Length JSON
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\n" + DATE + b"Content-Length: 321\r\n\r\n",
    # /v1/chat/completions streaming: SSE, chunked
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" + DATE + b"Transfer-Encoding: chunked\r\n\r\n",
    # an error: model not found
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json; charset=utf-8\r\n" + DATE
    + b"Content-Length: 42\r\n\r\n",
    # the Host check of an Ollama bound to loopback
    b"HTTP/1.1 403 Forbidden\r\n" + DATE + b"Content-Length: 0\r\n\r\n",
    # CORS preflight
    b"HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Headers: Authorization,Content-Type\r\n"
    b"Access-Control-Allow-Methods: GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS\r\n"
    b"Access-Control-Allow-Origin: *\r\nAccess-Control-Max-Age: 43200\r\n" + DATE + b"\r\n",
    # HEAD / (the ollama CLI's heartbeat)
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n" + DATE + b"Content-Length: 17\r\n\r\n",
    # Go's own answer to a bad request: closes
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n",
    # a server that is going away
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n" + DATE
    + b"Content-Length: 35\r\nConnection: close\r\n\r\n",
    # HTTP/1.0 answers (to an HTTP/1.0 request): until close, or kept alive
    b"HTTP/1.0 200 OK\r\nContent-Type: application/x-ndjson\r\n" + DATE + b"\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n",
    # interim responses
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    b"HTTP/1.1 304 Not Modified\r\nEtag: \"x\"\r\n" + DATE + b"\r\n",
    # a blob push
    b"HTTP/1.1 201 Created\r\n" + DATE + b"Content-Length: 0\r\n\r\n",
    # a proxy in between
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: keep-alive\r\nProxy-Connection: keep-alive\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\n\r\n",
]

EDGE_HEADS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",   # duplicates that agree
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0005\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \t 12 \t\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: \xd9\xa3\r\n\r\n",                # a non-ASCII digit
    b"HTTP/1.1 200 OK\r\nContent-Length: 123456789012345678901234567890\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999\r\nContent-Length: 099999999999999999\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 123456789012345678901234567890\r\n"
    b"Content-Length: 123456789012345678901234567891\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 9223372036854775808\r\n\r\n",    # 2**63
    b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000000000\r\n\r\n",     # 10**17
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,\x0bchunked\x0c\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Folded: one\r\n two\r\nContent-Length: 0\r\n\r\n",  # obs-fold
    b"HTTP/1.1 200 OK\r\n\tX-Lead: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Tabs:\t a \t\r\nContent-Type:\ttext/plain\t\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nName : value\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nName\t: value\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n X-Lead: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Empty:\r\nX-Colons: a:b:c\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Bare-LF: a\nb: c\r\n\r\n",
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",                             # bare LF line ends
    b"HTTP/1.1 200 OK\r\nX-CR: a\rb\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Ctl: a\x00b\x7f\r\nX-\xc3\xa9: caf\xc3\xa9\r\nX-UPPER\xc3\x89: 1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-End-CR: a\r\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",                           # no reason
    b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 2000K\r\n\r\n",
    b"HTTP/1.1 20 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 \xd9\xa300 OK\r\n\r\n",
    b"HTTP/1.1  200 OK\r\n\r\n",
    b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.x 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1-200 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTZ/1.1 200 OK\r\n\r\n",
    b"http/1.1 200 OK\r\n\r\n",
    b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 199 Odd\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 999 Odd\r\nContent-Length: 5\r\n\r\n",
    b"HTTP/1.1 000 Odd\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive, Upgrade\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive , CLOSE\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: \x0bkeep-alive\x0c,\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alived\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nConnection: ,\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nCONNECTION: CLOSE\r\nKEEP-ALIVE: x\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: a\r\nContent-Type: b\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",  # pipelined bytes after
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # Long bad lines and values: the messages quote the first 64 (a line) or 32 (a value) bytes.
    b"HTTZ/1.1 200 " + b"R" * 100 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Long-Line-Without-A-Colon-" + b"z" * 100 + b"\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: " + b"1" * 40 + b"x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + b"g" * 40 + b"\r\n\r\n",
]

INTERESTING = b" \t\r\n:,\x00\x0b\x7f\x80\xffA0;Cck-"


def outcome(parse, buf, head_request=False):
    """What a parse_response_head makes of buf, every field with its type."""
    try:
        result = parse(buf, head_request)
    except Exception as exc:  # noqa: BLE001 -- the point is to compare any exception
        return ("raised", type(exc), str(exc))
    if result is None:
        return None
    head, size = result
    fields = tuple((name, type(getattr(head, name)), getattr(head, name)) for name in FIELDS)
    headers = [tuple((type(x), x) for x in pair) for pair in head.headers]
    return ("head", fields, headers, type(size), size)


FIELDS = ("status", "reason", "headers", "framing", "length", "keep_alive", "hop_by_hop", "content_type")


def check(buf, head_request=False):
    """Assert compiled and reference agree on buf; say what they did."""
    expected = outcome(ref.parse_response_head, buf, head_request)
    assert outcome(parse_response_head, buf, head_request) == expected, buf
    return "none" if expected is None else expected[0]


@pytest.mark.parametrize("head", OLLAMA_HEADS + EDGE_HEADS)
@pytest.mark.parametrize("head_request", [False, True])
def test_heads_agree_with_the_reference(head, head_request):
    check(head, head_request)
    check(head + b'{"model":"llama3.2"}', head_request)
    # every incomplete prefix too
    for cut in range(len(head)):
        check(head[:cut], head_request)


def test_real_heads_parse():
    # Guards against a corpus both sides refuse: Ollama's heads are read.
    assert {check(h) for h in OLLAMA_HEADS} == {"head"}


@pytest.mark.parametrize("size", [MAX_HEAD - 1, MAX_HEAD, MAX_HEAD + 1, MAX_HEAD + 2, MAX_HEAD + 4, 3 * MAX_HEAD])
def test_the_size_limit_agrees(size):
    # The limit counts the head through its empty line, whole or incomplete,
    # and whatever follows it in the buffer.
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Big: "
    head = start + b"y" * (size - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == size
    whole = "head" if size <= MAX_HEAD else "raised"
    assert [check(head), check(head + b"body" * 100)] == [whole, whole]
    assert check(head[:-1]) == ("none" if size - 1 <= MAX_HEAD else "raised")
    assert check(head[:-4] + b"y" * 9000) == "raised"
    # A CRLF CRLF that straddles the limit.
    check(b"HTTP/1.1 200 OK\r\nX: " + b"y" * (size - 24) + b"\r\n\r\n")


def test_a_content_length_past_int_max_str_digits_raises_the_same():
    digits = sys.get_int_max_str_digits() or 4300
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: " + b"7" * (digits + 10) + b"\r\n\r\n"
    assert check(raw) == "raised"
    assert check(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n" + raw[17:]) == "raised"


def test_bytes_like_input_is_read_as_bytes():
    raw = OLLAMA_HEADS[0]
    for buf in (bytearray(raw), memoryview(raw)):
        head, size = parse_response_head(buf, False)
        expected, _ = ref.parse_response_head(raw, False)
        assert (head.status, head.reason, head.headers, head.framing, size) == (
            expected.status, expected.reason, expected.headers, expected.framing, len(raw))
        assert type(head.reason) is bytes


def test_random_mutations_agree_with_the_reference():
    rng = random.Random(20260603)
    outcomes = {"head": 0, "raised": 0, "none": 0}
    corpus = OLLAMA_HEADS + EDGE_HEADS
    for _ in range(4000):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            if not data:
                break
            op = rng.random()
            # Mostly after the status line, which most changes make malformed.
            at = rng.randrange(0 if len(data) < 18 or rng.random() < 0.25 else 17, len(data))
            if op < 0.35:
                data[at] = rng.choice(INTERESTING)
            elif op < 0.55:
                del data[at]
            elif op < 0.75:
                data.insert(at, rng.choice(INTERESTING))
            elif op < 0.9:
                # a line of another head spliced in
                other = rng.choice(corpus).split(b"\r\n")
                data[at:at] = rng.choice(other) + b"\r\n"
            else:
                del data[at:]  # a head cut short
        outcomes[check(bytes(data), rng.random() < 0.1)] += 1
    # Every outcome must be exercised, or the mutations test nothing.
    assert min(outcomes.values()) > 300, outcomes


def test_response_head_is_a_plain_record():
    # Built from Python with the Python class's arguments, fields writable.
    head = ResponseHead(200, b"OK", [], http.LENGTH, 2, True, False, b"")
    head.keep_alive = False
    head.status = 502
    assert (head.status, head.keep_alive, head.length, head.framing) == (502, False, 2, http.LENGTH)
    assert http.ResponseHead is ResponseHead and http.parse_response_head is parse_response_head
    assert (http.NO_BODY, http.CHUNKED, http.LENGTH, http.UNTIL_CLOSE) == (
        ref.NO_BODY, ref.CHUNKED, ref.LENGTH, ref.UNTIL_CLOSE)
    assert http.MAX_HEAD == ref.MAX_HEAD == 16 * 1024
    with pytest.raises(BackendProtocolError, match="larger than 16 KiB"):
        http.parse_response_head(b"x" * (MAX_HEAD + 1), False)


# --- upstream_head ------------------------------------------------------------------------


def req(headers, body=b"", version=b"1.1", method=b"POST", target=b"/api/chat", framing=None):
    return ProxyRequest(method, target, version, headers, body, True,
                        bool(body) if framing is None else framing)


CLIENT = [(b"host", b"127.0.0.1:11434"), (b"user-agent", b"ollama-python/0.4.7"),
          (b"accept-encoding", b"gzip, deflate"), (b"connection", b"keep-alive"),
          (b"content-length", b"96"), (b"content-type", b"application/json"), (b"accept", b"application/json")]

UPSTREAM_CASES = [
    req(CLIENT, b'{"model":"llama3.2","messages":[]}'),
    req([(b"host", b"a")], method=b"GET", target=b"/api/tags"),
    req([(b"host", b"a")], version=b"1.0", method=b"GET"),
    req([], method=b"GET"),                                               # HTTP/1.0 without Host
    req([(b"host", b"a")], framing=True),                                 # Content-Length: 0 framed
    req([(b"host", b"a")], body=b"x" * 1234567),
    req([(b"host", b"olb.example"), (b"connection", b"keep-alive, x-secret"), (b"keep-alive", b"timeout=5"),
         (b"x-secret", b"1"), (b"transfer-encoding", b"chunked"), (b"authorization", b"Bearer k"),
         (b"x-forwarded-for", b"10.0.0.1"), (b"expect", b"100-continue")], body=b"{}"),
    # Connection names fields before and after it, in any case, with odd spacing
    req([(b"x-a", b"1"), (b"host", b"h"), (b"connection", b" X-A ,\tx-b\x0b, , close"), (b"x-b", b"2"),
         (b"x-c", b"3"), (b"connection", b"X-C"), (b"x-a", b"again")]),
    # Connection names x-forwarded-for, host, content-length: those are handled anyway
    req([(b"host", b"h"), (b"x-forwarded-for", b"1.2.3.4"), (b"connection", b"x-forwarded-for, host")]),
    # an empty token names the empty name
    req([(b"host", b"h"), (b"connection", b","), (b"", b"nameless"), (b"x", b"y")]),
    # more tokens than the compiled path keeps in C
    req([(b"host", b"h"), (b"connection", b",".join(b"x-%d" % i for i in range(30)))]
        + [(b"x-%d" % i, b"v") for i in range(0, 40, 3)]),
    req([(b"host", b"h")] + [(b"connection", b"x-%d" % i) for i in range(12)]
        + [(b"x-%d" % i, b"v") for i in range(20)]),
    # an upper-case name is never named (tokens are lower-cased, names compared exactly)
    req([(b"host", b"h"), (b"connection", b"x-up"), (b"X-UP", b"1"), (b"x-up", b"2")]),
    # an empty X-Forwarded-For, two of them, two Hosts
    req([(b"host", b"h1"), (b"x-forwarded-for", b""), (b"host", b"h2")]),
    req([(b"x-forwarded-for", b"a"), (b"x-forwarded-for", b"b")]),
    # upper-case hop-by-hop names are not RequestReader's, but are forwarded as the Python did
    req([(b"Host", b"h"), (b"Connection", b"close"), (b"TE", b"trailers"), (b"te", b"trailers")]),
    req([(b"host", b"h"), (b"proxy-authorization", b"Basic x"), (b"proxy-connection", b"keep-alive"),
         (b"upgrade", b"h2c"), (b"trailer", b"x"), (b"content-length", b"3")], body=b"abc"),
    req([(b"host", b"h"), (b"x-note", b"caf\xc3\xa9 \t"), (b"cookie", b"a=b; c=d")], target=b"/?q=\xff"),
    # not plain bytes in a list of tuples: the general path
    req([(b"host", bytearray(b"h")), (b"x", memoryview(b"y"))]),
    req([[b"host", b"h"], (b"connection", b"x"), (b"x", b"1")]),
    req(((b"host", b"h"), (b"x", b"1"))),
    req([(b"host", b"h")], body=bytearray(b"abc")),
    req([(b"host", b"h")], target=bytearray(b"/api/tags"), method=b"GET"),
    req([(b"host", b"h"), ("x-str", b"1")]),
    req([(b"host", b"h"), (b"x", None)]),
    req([(b"host", b"h"), (b"x", b"1", b"extra")]),
]


def upstream_outcome(fn, request, hostport=b"127.0.0.1:11435", client_ip=b"10.1.2.3"):
    try:
        out = fn(request, hostport, client_ip)
    except Exception as exc:  # noqa: BLE001 -- the point is to compare any exception
        return ("raised", type(exc))
    return (type(out), out)


@pytest.mark.parametrize("case", range(len(UPSTREAM_CASES)))
def test_upstream_heads_agree_with_the_reference(case):
    request = UPSTREAM_CASES[case]
    for hostport, client_ip in [(b"127.0.0.1:11435", b"10.1.2.3"), (b"b:1", b""), (bytearray(b"b:1"), b"c")]:
        expected = upstream_outcome(ref.upstream_head, request, hostport, client_ip)
        assert upstream_outcome(upstream_head, request, hostport, client_ip) == expected


def with_body(request, hostport, client_ip):
    """The head and a small body in one buffer, as proxy.Exchange._send asks for it."""
    return upstream_head_parts(request.method, request.target, request.http_version == b"1.0", request.headers,
                               request.body, request.has_body_framing, hostport, client_ip, True)


@pytest.mark.parametrize("case", range(len(UPSTREAM_CASES)))
def test_upstream_head_with_the_body_is_the_head_then_the_body(case):
    request = UPSTREAM_CASES[case]
    expected = upstream_outcome(ref.upstream_head, request)
    if expected[0] is bytes:
        expected = (bytes, expected[1] + bytes(request.body))
    assert upstream_outcome(with_body, request) == expected


def test_upstream_head_builds_what_the_python_built():
    out = upstream_head(UPSTREAM_CASES[0], b"127.0.0.1:11435", b"10.1.2.3")
    assert out == (b"POST /api/chat HTTP/1.1\r\nhost: 127.0.0.1:11435\r\nuser-agent: ollama-python/0.4.7\r\n"
                   b"accept-encoding: gzip, deflate\r\ncontent-type: application/json\r\n"
                   b"accept: application/json\r\nx-forwarded-for: 10.1.2.3\r\n"
                   b"x-forwarded-host: 127.0.0.1:11434\r\ncontent-length: 34\r\n\r\n")
    assert http.upstream_head is upstream_head


NAMES = [b"host", b"connection", b"keep-alive", b"x-forwarded-for", b"content-length", b"te", b"expect",
         b"x-a", b"x-b", b"authorization", b"content-type", b"upgrade", b"trailer", b"proxy-connection",
         b"transfer-encoding", b"proxy-authorization", b"x-forwarded-host", b"", b"X-A", b"tE"]
TOKENS = [b"x-a", b"X-B", b" x-a ", b"close", b"keep-alive", b"host", b"", b"\tx-b\x0c", b"x-forwarded-for",
          b"content-type", b"TE"]


def test_random_upstream_requests_agree_with_the_reference():
    rng = random.Random(20260604)
    for _ in range(3000):
        headers = []
        for _ in range(rng.randint(0, 9)):
            name = rng.choice(NAMES)
            if name == b"connection":
                value = b",".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 11)))
            else:
                value = rng.choice([b"", b"v", b"10.0.0.%d" % rng.randrange(256), b"a, b", b"\xc3\xa9 "])
            headers.append((name, value))
        request = req(headers, body=rng.choice([b"", b"{}", b"x" * rng.randrange(100000)]),
                      version=rng.choice([b"1.1", b"1.0"]), method=rng.choice([b"GET", b"POST", b"DELETE"]),
                      target=rng.choice([b"/api/chat", b"/v1/models?x=1", b"/"]),
                      framing=rng.random() < 0.5)
        client_ip = rng.choice([b"127.0.0.1", b"::1", b""])
        expected = upstream_outcome(ref.upstream_head, request, b"127.0.0.1:11435", client_ip)
        assert upstream_outcome(upstream_head, request, b"127.0.0.1:11435", client_ip) == expected, headers
