"""olb._relay.Relay: the compiled per-chunk path, driven without sockets.

The proxy's integration tests drive it over real connections; these pin the
contract with the Python subclass: which callback gets which bytes.
"""

import time

import pytest

from olb._http import BodyScanner
from olb._relay import Relay, monotonic


class Recorder(Relay):
    __slots__ = ("calls",)

    def __init__(self):
        self.calls = []
        self.forward = lambda data: self.calls.append(("forward", data))

    def _read_head(self, data):
        self.calls.append(("head", data))

    def _end(self, data, end):
        self.calls.append(("end", data, end))

    def _protocol_error(self, message):
        self.calls.append(("error", message))


def test_fields_start_empty():
    r = Relay()
    assert r.head is None and r.forward is None and r.last_io == 0.0
    assert isinstance(r.scanner, BodyScanner)


def test_bytes_before_the_head_go_to_read_head():
    r = Recorder()
    r.data_received(b"HTTP/1.1 200 OK\r\n")
    assert r.calls == [("head", b"HTTP/1.1 200 OK\r\n")]
    assert r.last_io == 0.0  # the head path stamps last_io itself


def test_body_bytes_are_forwarded_as_the_same_object_until_the_end():
    r = Recorder()
    r.head = object()
    r.scanner.expect_chunked()
    first, second, last = b"3\r\nabc\r\n", b"2\r\nde\r\n", b"0\r\n\r\nEXTRA"
    before = monotonic()
    r.data_received(first)
    r.data_received(second)
    assert r.last_io >= before
    r.data_received(last)
    assert r.calls[0][1] is first and r.calls[1][1] is second  # no copies
    assert r.calls == [("forward", first), ("forward", second), ("end", last, 5)]


def test_length_body_end_offset():
    r = Recorder()
    r.head = object()
    r.scanner.expect_length(4)
    r.data_received(b"ab")
    r.data_received(b"cdHTTP")
    assert r.calls == [("forward", b"ab"), ("end", b"cdHTTP", 2)]


def test_malformed_chunked_body_reports_and_forwards_nothing():
    r = Recorder()
    r.head = object()
    r.scanner.expect_chunked()
    r.data_received(b"zz\r\n")
    assert len(r.calls) == 1 and r.calls[0][0] == "error"
    assert "malformed chunked body" in r.calls[0][1] and "b'z'" in r.calls[0][1]


def test_feed_before_expect_is_a_programming_error_not_a_protocol_error():
    r = Recorder()
    r.head = object()
    with pytest.raises(RuntimeError):
        r.data_received(b"x")
    assert r.calls == []


def test_monotonic_is_the_clock_of_time_monotonic():
    # The idle timer compares last_io with monotonic(); both read
    # CLOCK_MONOTONIC, as time.monotonic() does on Linux.
    a = time.monotonic()
    b = monotonic()
    c = time.monotonic()
    assert a - 0.01 <= b <= c + 0.01


def test_keep_holds_the_forwarded_objects_themselves():
    """What a chat stream forwarded stays readable for olb/resume.py: the same
    bytes objects, not copies, and not the body's tail (the stream ended)."""
    r = Recorder()
    r.head = object()
    r.scanner.expect_chunked()
    r.keep, r.keep_left = [], 100
    first, second = b"3\r\nabc\r\n", b"2\r\nde\r\n"
    r.keep_data(b"1\r\nz\r\n")
    r.data_received(first)
    r.data_received(second)
    r.data_received(b"0\r\n\r\n")
    assert r.keep[1] is first and r.keep[2] is second
    assert r.keep == [b"1\r\nz\r\n", first, second]
    assert r.keep_left == 100 - 6 - len(first) - len(second)


def test_keep_past_its_bound_lets_go_and_leaves_a_marker():
    r = Recorder()
    r.head = object()
    r.scanner.expect_chunked()
    kept = r.keep = []
    r.keep_left = 12
    r.data_received(b"3\r\nabc\r\n")
    r.data_received(b"3\r\ndef\r\n")  # 16 bytes > 12
    assert kept == [None] and r.keep is None
    r.data_received(b"3\r\nghi\r\n")
    r.keep_data(b"more")
    assert kept == [None]
    assert [c[0] for c in r.calls] == ["forward"] * 3  # forwarding goes on regardless


def test_nothing_is_kept_by_default():
    r = Recorder()
    r.head = object()
    r.scanner.expect_chunked()
    r.keep_data(b"x")
    r.data_received(b"3\r\nabc\r\n")
    assert r.keep is None
