"""Slow and hostile clients without sockets: the reader's limits and states, the clock, the budget.

The socket-level tests are tests/integration/test_hostile_clients.py.
"""

import pytest

from olb.errors import BadRequest
from olb.http import BODY, HEAD, IDLE, MAX_HEAD, NEED_DATA, RequestReader, _head_length, _origin_form
from olb.slowclient import BodyBudget, RequestClock


def pieces(data: bytes, mode: str) -> list[bytes]:
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    step = -(-len(data) // 20)
    return [data[i:i + step] for i in range(0, len(data), step)]


def read(data: bytes, mode: str, max_body: int = 1 << 20):
    """Feed `data` in pieces; the first request, or the last NEED_DATA's reader."""
    reader = RequestReader(max_body)
    for piece in pieces(data, mode):
        reader.receive(piece)
        got = reader.next_request()
        if got is not NEED_DATA:
            return got, reader
    return NEED_DATA, reader


def head_of(size: int, bare_lf: bool = False) -> bytes:
    """A GET head of exactly `size` bytes."""
    start = b"GET /api/version HTTP/1.1\r\nHost: x\r\n" if not bare_lf else b"GET /api/version HTTP/1.1\nHost: x\n"
    end = b"\r\n" if not bare_lf else b"\n"
    pad_len = size - len(start) - len(end) - len(b"X-Pad: ") - len(end)
    head = start + b"X-Pad: " + b"a" * pad_len + end + end
    assert len(head) == size
    return head


# Byte by byte only at the boundary (a 65 KB head fed a byte at a time adds nothing but time).
HEAD_CASES = [(mode, size, ok) for mode in ("whole", "20", "bytes")
              for size, ok in [(MAX_HEAD - 100, True), (MAX_HEAD, True), (MAX_HEAD + 1, False),
                               (17_000, False), (65_000, False)]
              if mode != "bytes" or size <= MAX_HEAD + 1]


@pytest.mark.parametrize("mode,size,ok", HEAD_CASES)
@pytest.mark.parametrize("bare_lf", [False, True], ids=["crlf", "bare-lf"])
def test_head_limit_is_one_limit_however_the_bytes_arrive(mode, size, ok, bare_lf):
    data = head_of(size, bare_lf)
    if ok:
        req, _ = read(data, mode)
        assert req.target == b"/api/version"
    else:
        with pytest.raises(BadRequest) as err:
            read(data, mode)
        assert err.value.status_hint == 431


@pytest.mark.parametrize("data,length", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 27),
    (b"GET / HTTP/1.1\nHost: x\n\nrest", 24),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", -1),
])
def test_head_length_as_h11_finds_it(data, length):
    assert _head_length(data, MAX_HEAD) == length


@pytest.mark.parametrize("mode", ["whole", "20", "bytes"])
def test_waiting_says_what_a_partial_request_waits_for(mode):
    head = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n"
    _, reader = read(head[:-3], mode)
    assert reader.waiting == HEAD
    _, reader = read(head + b"x" * 25, mode)
    assert reader.waiting == BODY and reader.body_bytes == 25
    # The same through h11 (a chunked body).
    chunked = b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n19\r\n" + b"x" * 10
    _, reader = read(chunked, mode)
    assert reader.waiting == BODY and reader.body_bytes == 10
    req, reader = read(head + b"x" * 40, mode)
    assert req.body == b"x" * 40 and reader.waiting == IDLE


@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_content_length_and_transfer_encoding_end_the_connection(mode):
    data = (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
    req, reader = read(data, mode)
    assert req.body == b"hello" and not req.keep_alive
    assert not reader.finish_response(200, not req.keep_alive)


@pytest.mark.parametrize("data", [
    b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\ntransfer-encoding : x\r\n\tchunked\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 0\r\n\r\n",
])
def test_folded_framing_fields_are_refused(data):
    with pytest.raises(BadRequest) as err:
        read(data, "whole")
    assert err.value.status_hint == 400


def test_folding_elsewhere_is_left_to_h11():
    req, _ = read(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n b\r\n\r\n", "whole")
    assert req.header(b"x-long") == b"a b"


@pytest.mark.parametrize("method,target,host,want", [
    (b"GET", b"/api/tags", b"h", (b"/api/tags", b"h")),
    (b"GET", b"http://a:11434/api/tags?x=1", b"h", (b"/api/tags?x=1", b"a:11434")),
    (b"GET", b"HTTPS://a", b"h", (b"/", b"a")),
    (b"GET", b"http://a?q", b"h", (b"/?q", b"a")),
    (b"GET", b"http://a", None, (b"/", b"a")),
    (b"GET", b"ftp://a/x", b"h", None),
    (b"GET", b"http:///x", b"h", None),
    (b"GET", b"http://u@a/x", b"h", None),
    (b"GET", b"*", b"h", None),
    (b"OPTIONS", b"*", b"h", None),
    (b"GET", b"a:80", b"h", None),
    (b"CONNECT", b"a:443", b"h", None),
    (b"CONNECT", b"/x", b"h", None),
    (b"PRI", b"*", b"h", None),
])
def test_origin_form(method, target, host, want):
    headers = [(b"host", host)] if host is not None else []
    if want is None:
        with pytest.raises(BadRequest) as err:
            _origin_form(method, target, headers)
        assert err.value.status_hint == 400
        return
    got, new_headers = _origin_form(method, target, headers)
    assert (got, dict(new_headers)[b"host"]) == want


def test_fast_and_h11_paths_both_rewrite_absolute_form():
    fast, _ = read(b"GET http://a/api/tags HTTP/1.1\r\nHost: x\r\n\r\n", "whole")
    slow, _ = read(b"GET http://a/api/tags HTTP/1.1\r\nHost: x\r\nExpect: nothing\r\n\r\n", "whole")
    for req in (fast, slow):
        assert req.target == b"/api/tags" and req.header(b"host") == b"a"


# --- the clock and the budget ------------------------------------------------------

@pytest.mark.parametrize("waiting,body_bytes,want", [
    (HEAD, 0, 100 + 10),           # a head: its first byte + OLB_HEADER_TIMEOUT
    (BODY, 0, 105 + 10),           # a body: from the read that completed the head + OLB_BODY_TIMEOUT
    (BODY, 2048, 105 + 10 + 2),    # + one second per OLB_BODY_MIN_RATE bytes
    (IDLE, 0, float("inf")),
])
def test_deadlines(waiting, body_bytes, want):
    clock = RequestClock(BodyBudget(100))
    clock.received(10, 100.0)
    assert clock.deadline(waiting, body_bytes, 105.0, 10, 10, 1024) == want


def test_body_deadline_starts_once_and_moves_only_with_bytes():
    clock = RequestClock(BodyBudget(100))
    clock.received(1, 0.0)
    first = clock.deadline(BODY, 0, 3.0, 10, 10, 1)
    assert clock.deadline(BODY, 0, 9.0, 10, 10, 1) == first == 13.0   # time alone moves nothing
    assert clock.deadline(BODY, 4, 9.0, 10, 10, 1) == 17.0            # 4 bytes at 1 B/s: 4 s more


def test_budget_counts_across_connections_and_gives_back():
    budget = BodyBudget(100)
    a, b = RequestClock(budget), RequestClock(budget)
    a.received(60, 0.0)
    b.received(30, 0.0)
    assert budget.held == 90 and not budget.over
    b.received(20, 1.0)
    assert budget.over
    a.done()
    assert budget.held == 50 and not budget.over and a.began is None
    b.done()
    b.done()  # a second done gives back nothing more
    assert budget.held == 0
