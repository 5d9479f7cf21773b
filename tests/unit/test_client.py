"""olb.client's sans-IO part: ResponseReader fed whole, byte by byte and in halves."""

import pytest

from olb.client import NEED_DATA, Response, ResponseReader
from olb.errors import BackendProtocolError

LENGTH_RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": 123}\n"
CHUNKED_RESP = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
CLOSE_RESP = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil eof"
CONTINUE_RESP = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"


def pieces(data, mode):
    if mode == "whole":
        return [data]
    if mode == "bytes":
        return [data[i:i + 1] for i in range(len(data))]
    return [data[: len(data) // 2], data[len(data) // 2:]]


def drive(data, mode, eof=False, max_body=1 << 20, method=b"GET"):
    """Send one request, feed the response; return (head, body, ended)."""
    reader = ResponseReader(b"127.0.0.1:1", max_body=max_body)
    reader.request_head(method, b"/x")
    reader.end()
    head, body, ended = None, [], False
    feeds = pieces(data, mode) + ([b""] if eof else [])
    for piece in feeds:
        reader.receive(piece)
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, Response):
                head = event
            elif event is ResponseReader.END:
                ended = True
                break
            else:
                body.append(event)
    return head, b"".join(body), ended, reader


@pytest.mark.parametrize("mode", ["whole", "bytes", "halves"])
@pytest.mark.parametrize("data, eof, status, body, reusable", [
    (LENGTH_RESP, False, 200, b'{"a": 123}\n', True),
    (CHUNKED_RESP, False, 200, b"hello world", True),
    (CLOSE_RESP, True, 200, b"until eof", False),
    (CONTINUE_RESP, False, 404, b"{}", True),
])
def test_response_read_in_any_pieces(mode, data, eof, status, body, reusable):
    head, got, ended, reader = drive(data, mode, eof)
    assert head.status == status
    assert got == body and ended
    assert reader.start_next_cycle() is reusable


def test_headers_lower_case_and_lookup():
    head, _, _, _ = drive(LENGTH_RESP, "whole")
    assert head.header(b"content-type") == b"application/json"
    assert head.header(b"x-missing") is None


def test_request_head_sets_host_and_length():
    reader = ResponseReader(b"10.0.0.1:11434")
    out = reader.request_head(b"POST", b"/api/pull", [(b"content-type", b"application/json")], 7)
    assert out.startswith(b"POST /api/pull HTTP/1.1\r\n")
    assert b"host: 10.0.0.1:11434\r\n" in out
    assert b"content-length: 7\r\n" in out
    assert reader.data(b"{}12345") == b"{}12345"


@pytest.mark.parametrize("data", [LENGTH_RESP, CHUNKED_RESP])
def test_body_over_cap_is_protocol_error(data):
    with pytest.raises(BackendProtocolError, match="over 4 bytes"):
        drive(data, "whole", max_body=4)


def test_head_over_cap_is_protocol_error():
    reader = ResponseReader(b"h:1", max_head=64)
    reader.request_head(b"GET", b"/")
    reader.end()
    reader.receive(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100)
    with pytest.raises(BackendProtocolError):
        reader.next_event()


def test_whole_head_over_cap_is_protocol_error():
    reader = ResponseReader(b"h:1", max_head=64)
    reader.request_head(b"GET", b"/")
    reader.end()
    reader.receive(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 100 + b"\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(BackendProtocolError, match="head over 64 bytes"):
        reader.next_event()


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_not_http_is_protocol_error(garbage):
    with pytest.raises(BackendProtocolError):
        drive(garbage, "whole")


def test_eof_mid_body_is_protocol_error():
    with pytest.raises(BackendProtocolError):
        drive(LENGTH_RESP[:-3], "whole", eof=True)


def test_cycle_not_reusable_before_the_end():
    head, _, ended, reader = drive(LENGTH_RESP[:-3], "whole")
    assert head.status == 200 and not ended
    assert reader.start_next_cycle() is False


def test_two_cycles_on_one_connection():
    reader = ResponseReader(b"h:1")
    for _ in range(2):
        reader.request_head(b"GET", b"/")
        reader.end()
        reader.receive(LENGTH_RESP)
        assert reader.next_event().status == 200
        assert reader.next_event() == b'{"a": 123}\n'
        assert reader.next_event() is ResponseReader.END
        assert reader.start_next_cycle()
