"""olb._http.parse_request_head against h11, the parser of record.

The fast parser may decline anything (h11 then parses it); what it must
never do is accept a head h11 would read differently or refuse. Checked on
real clients' heads, on hand-written edge cases, and on seeded random
mutations of both.
"""

import random

import h11
import pytest

from olb._http import parse_request_head
from olb._http import connection_tokens
from olb.http import MAX_HEAD, RequestReader, _items

# Request heads as the clients olb serves write them (captured from each
# client's own code: header order, case and spacing as sent).
CLIENT_HEADS = [
    # curl 7.88
    b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n"
    b"Content-Length: 43\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n",
    # httpx, as used by the ollama Python client
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nContent-Length: 96\r\nContent-Type: application/json\r\n"
    b"Accept: application/json\r\nUser-Agent: ollama-python/0.4.7 (x86_64 linux) Python/3.11.7\r\n\r\n",
    # the openai Python client (httpx, its x-stainless-* fields)
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nAccept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\nAccept: application/json\r\nContent-Type: application/json\r\n"
    b"User-Agent: OpenAI/Python 1.54.0\r\nX-Stainless-Lang: python\r\nX-Stainless-Package-Version: 1.54.0\r\n"
    b"X-Stainless-OS: Linux\r\nX-Stainless-Arch: x64\r\nX-Stainless-Runtime: CPython\r\n"
    b"X-Stainless-Runtime-Version: 3.11.7\r\nAuthorization: Bearer ollama\r\nX-Stainless-Async: false\r\n"
    b"x-stainless-retry-count: 0\r\nContent-Length: 88\r\n\r\n",
    # Go net/http, as used by the ollama CLI
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nUser-Agent: ollama/0.5.7 (amd64 linux) Go/go1.23.4\r\n"
    b"Content-Length: 120\r\nAccept: application/x-ndjson\r\nContent-Type: application/json\r\n"
    b"Accept-Encoding: gzip\r\n\r\n",
    # python-requests, a GET
    b"GET /api/tags HTTP/1.1\r\nHost: localhost:11434\r\nUser-Agent: python-requests/2.31.0\r\n"
    b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n",
    # aiohttp
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:11434\r\nAccept: */*\r\nAccept-Encoding: gzip, deflate\r\n"
    b"User-Agent: Python/3.11 aiohttp/3.9.5\r\n\r\n",
    # an HTTP/1.0 client behind an old proxy
    b"GET /api/version HTTP/1.0\r\nHost: olb\r\nX-Forwarded-For: 10.0.0.7\r\n\r\n",
    # a browser-ish head with obs-text and tabs in values, an absolute-form target
    b"GET http://olb.example/api/ps?x=1 HTTP/1.1\r\nHost: olb.example\r\nX-Note:\t caf\xc3\xa9 \t \r\n"
    b"Cookie: a=b; c=d\r\nConnection: Upgrade, close\r\nX-Empty:\r\n\r\n",
]

# Edge cases, each either declined or read as h11 reads it.
EDGE_HEADS = [
    b"GET / HTTP/1.1\r\n\r\n",                                        # no Host on 1.1: h11 refuses
    b"GET / HTTP/1.0\r\n\r\n",                                        # no Host on 1.0: h11 accepts
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",                  # two Hosts
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0007\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 123456789012345678901\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: one\r\n two\r\n\r\n",      # obs-fold
    b"GET / HTTP/1.1\r\nHost: a\r\n X-Lead: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",                           # space before the colon
    b"GET / HTTP/1.1\nHost: a\n\n",                                  # bare LF line ends
    b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",                      # bare CR
    b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",                       # NUL in a value
    b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",                       # other CTLs h11 allows
    b"GET / HTTP/1.1\r\nHost: a\x7fb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\x0bb\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n",                    # obs-text in the target
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: a\r\n\r\n",
    b"GET / http/1.1\r\nHost: a\r\n\r\n",
    b"GET /\r\nHost: a\r\n\r\n",
    b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",                        # a leading empty line
    b" GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive , CLOSE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: closed\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: ,\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nhOsT: a\r\nCONTENT-LENGTH: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:\r\n\r\n",                              # an empty Host
    b"GET / HTTP/1.1\r\nHost: a\r\n:x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\r\n",
]

INTERESTING = b" \t\r\n:,\x00\x01\x7f\x80\xffA0;"


def h11_reads(data: bytes):
    """What h11 makes of data as the start of a request: "need", "error" or the fields."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    if data:  # b"" would mean EOF to h11
        conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "error"
    if event is h11.NEED_DATA:
        return "need"
    assert type(event) is h11.Request
    headers = _items(event.headers)
    lengths = [int(v) for n, v in headers if n == b"content-length"]
    keep_alive = event.http_version == b"1.1" and b"close" not in connection_tokens(headers)
    return (event.method, event.target, event.http_version, headers, lengths[0] if lengths else -1, keep_alive)


def check_against_h11(data: bytes) -> str:
    """Assert the fast parser agrees with h11 on data; say what it did."""
    fast = parse_request_head(data, MAX_HEAD)
    if fast is False:
        return "declined"
    if fast is None:
        assert h11_reads(data) == "need", data
        return "need"
    method, target, version, headers, head_len, length, keep_alive = fast
    assert h11_reads(data[:head_len]) == (method, target, version, headers, length, keep_alive), data
    # head_len is exact: one byte less and h11 wants more.
    assert h11_reads(data[:head_len - 1]) == "need", data
    return "accepted"


@pytest.mark.parametrize("head", CLIENT_HEADS)
def test_real_client_heads_take_the_fast_path(head):
    assert check_against_h11(head + b'{"model": "llama3.2"}') == "accepted"


@pytest.mark.parametrize("head", EDGE_HEADS)
def test_edge_cases_agree_with_h11_or_are_declined(head):
    check_against_h11(head)


def test_accepted_edge_cases_are_the_plain_ones():
    # Guards against a parser that declines everything (which the tests
    # above would let through): these are plain and must be accepted.
    accepted = [h for h in EDGE_HEADS if check_against_h11(h) == "accepted"]
    assert b"GET / HTTP/1.1\r\nhOsT: a\r\nCONTENT-LENGTH: 0\r\n\r\n" in accepted
    assert b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive , CLOSE\r\n\r\n" in accepted
    assert b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0007\r\n\r\n" in accepted
    assert b"GET / HTTP/1.1\r\nHost:\r\n\r\n" in accepted


def test_random_mutations_agree_with_h11():
    rng = random.Random(20261121)
    outcomes = {"accepted": 0, "declined": 0, "need": 0}
    for _ in range(6000):
        data = bytearray(rng.choice(CLIENT_HEADS + EDGE_HEADS))
        for _ in range(rng.randint(1, 3)):
            if not data:
                break
            op = rng.random()
            at = rng.randrange(len(data))
            if op < 0.45:
                data[at] = rng.choice(INTERESTING)
            elif op < 0.7:
                del data[at]
            elif op < 0.9:
                data.insert(at, rng.choice(INTERESTING))
            else:
                del data[at:]  # a head cut short
        outcomes[check_against_h11(bytes(data))] += 1
    # Every outcome must be exercised, or the mutations test nothing.
    assert min(outcomes.values()) > 200, outcomes


def test_oversized_head_is_declined_and_h11_answers_431():
    head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"x" * MAX_HEAD
    assert parse_request_head(head, MAX_HEAD) is False
    assert parse_request_head(head[:100], MAX_HEAD) is None


def test_search_resumes_where_it_stopped():
    head = CLIENT_HEADS[0]
    for cut in range(1, len(head)):
        assert parse_request_head(head[:cut], MAX_HEAD) is None
        resumed = parse_request_head(head, MAX_HEAD, cut)
        assert resumed == parse_request_head(head, MAX_HEAD)


def test_reader_takes_both_paths_on_one_connection():
    # FAST, then a chunked request (h11), then FAST again, pipelined in one read.
    plain = b"GET /api/tags HTTP/1.1\r\nHost: a\r\n\r\n"
    chunked = (b"POST /api/generate HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\n{}\r\n0\r\n\r\n")
    reader = RequestReader(max_body=1024)
    reader.receive(plain + chunked + plain)
    seen = []
    for _ in range(3):
        req = reader.next_request()
        seen.append((req.method, req.body))
        assert reader.finish_response(200, closing=False)
    assert seen == [(b"GET", b""), (b"POST", b"{}"), (b"GET", b"")]
    assert reader.next_request() is h11.NEED_DATA


def test_reader_waits_for_a_body_sent_after_its_head():
    head = b"POST /api/chat HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n"
    reader = RequestReader(max_body=1024)
    reader.receive(head)
    assert reader.next_request() is h11.NEED_DATA
    reader.receive(b"{")
    assert reader.next_request() is h11.NEED_DATA
    reader.receive(b"}GET")
    req = reader.next_request()
    assert req.body == b"{}" and req.has_body_framing
    assert reader.next_request() is h11.PAUSED  # "GET" waits for the response


def test_reader_eof_inside_a_head_is_h11s_error():
    from olb.errors import BadRequest
    reader = RequestReader(max_body=1024)
    reader.receive(b"GET / HTTP/1.1\r\nHo")
    assert reader.next_request() is h11.NEED_DATA
    reader.receive(b"")
    with pytest.raises(BadRequest):
        reader.next_request()
