"""BodyScanner: end offsets fed whole, byte by byte and at every split point,
checked against h11 parsing the same bytes; malformed framing raises."""

import random

import h11
import pytest

from olb._http import BodyScanner

NEXT_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def ndjson_body(n_chunks=5):
    # What Ollama's /api/generate streams: one JSON object per chunk.
    out = []
    for i in range(n_chunks):
        line = (b'{"model":"llama3.2","created_at":"2024-06-01T12:00:00.%06dZ",'
                b'"response":" tok%d","done":false}\n' % (i, i))
        out.append(b"%x\r\n%s\r\n" % (len(line), line))
    out.append(b"0\r\n\r\n")
    return b"".join(out)


VALID = {
    "empty": b"0\r\n\r\n",
    "one_chunk": b"5\r\nhello\r\n0\r\n\r\n",
    "hex_sizes": b"A\r\n0123456789\r\na\r\nabcdefghij\r\n1F\r\n" + b"x" * 31 + b"\r\n0\r\n\r\n",
    "leading_zeros": b"005\r\nhello\r\n0000\r\n\r\n",
    "extensions": b'5;name=value\r\nhello\r\n3;a;b="c d"\r\nabc\r\n0;last\r\n\r\n',
    "trailing_ows": b"5 \r\nhello\r\n0\t\r\n\r\n",
    "trailers": b"5\r\nhello\r\n0\r\nX-A: 1\r\nX-Checksum: abc\r\n\r\n",
    "framing_inside_data": b"7\r\n0\r\n\r\nxy\r\n0\r\n\r\n",
    "crlf_data": b"2\r\n\r\n\r\n0\r\n\r\n",
    "big_chunk": b"10000\r\n" + bytes(range(256)) * 256 + b"\r\n0\r\n\r\n",
    "ndjson": ndjson_body(),
}

MALFORMED = {
    "non_hex_start": (b"x\r\n", "expected a hex digit"),
    "empty_size": (b"\r\n", "expected a hex digit"),
    "sign": (b"+5\r\nhello\r\n", "expected a hex digit"),
    "0x_prefix": (b"0x5\r\nhello\r\n", "invalid character in chunk-size line"),
    "junk_in_size": (b"5g\r\nhello\r\n", "invalid character in chunk-size line"),
    "junk_after_ws": (b"5 x\r\nhello\r\n", "invalid character after chunk size"),
    "bare_lf_size": (b"5\nhello\r\n", "invalid character in chunk-size line"),
    "cr_without_lf": (b"5\rXhello\r\n", "expected LF after CR in chunk-size line"),
    "bare_lf_ext": (b"5;a=b\nhello\r\n", "bare LF in chunk extension"),
    "data_too_long": (b"5\r\nhelloX\r\n0\r\n\r\n", "expected CRLF after chunk data"),
    "data_cr_no_lf": (b"5\r\nhello\rX0\r\n\r\n", "expected LF after CR following chunk data"),
    "bare_lf_after_data": (b"5\r\nhello\n0\r\n\r\n", "expected CRLF after chunk data"),
    "bare_lf_final": (b"0\r\n\n", "bare LF in trailer section"),
    "bare_lf_trailer": (b"0\r\nX-A: 1\nX", "bare LF in trailer field"),
    "trailer_not_a_field": (b"0\r\nhello\r\n\r\n", "invalid trailer field name"),
    "trailer_bad_name": (b"0\r\nX A: 1\r\n\r\n", "invalid trailer field name"),
    "trailer_obs_fold": (b"0\r\nX-A: 1\r\n 2\r\n\r\n", "invalid trailer field name"),
    "mis_sized_chunk": (b"0\r\nhello\r\n0\r\n\r\n", "invalid trailer field name"),
    "trailer_cr_no_lf": (b"0\r\nX-A: 1\rX", "expected LF after CR in trailer field"),
    "final_cr_no_lf": (b"0\r\n\rX", "expected LF after CR ending the trailer section"),
    "size_2_64": (b"1" + b"0" * 16 + b"\r\n", "chunk size above 2\\*\\*62"),
    "size_2_62_plus_1": (b"4000000000000001\r\n", "chunk size above 2\\*\\*62"),
    "long_extension": (b"5;" + b"a" * 4095 + b"\r\nhello\r\n", "longer than 4096 bytes"),
    "long_zeros": (b"0" * 4097 + b"5\r\nhello\r\n", "longer than 4096 bytes"),
    "long_trailer": (b"0\r\nX: " + b"v" * 4094 + b"\r\n\r\n", "longer than 4096 bytes"),
    "long_trailer_name": (b"0\r\n" + b"X" * 4097 + b": v\r\n\r\n", "longer than 4096 bytes"),
}


def scan(pieces):
    """Feed `pieces` to a fresh chunked scanner; the absolute end offset or -1."""
    scanner = BodyScanner()
    scanner.expect_chunked()
    consumed = 0
    for piece in pieces:
        result = scanner.feed(piece)
        if result >= 0:
            return consumed + result
        consumed += len(piece)
    return -1


def h11_end(data):
    """Where h11 ends a chunked response body within `data`; None if it needs
    more, "error" if it rejects the framing."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + data)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return None
            if type(event) is h11.EndOfMessage:
                return len(data) - len(conn.trailing_data[0])
    except h11.RemoteProtocolError:
        return "error"


def splits(data):
    """The same bytes in the shapes a socket may deliver them."""
    yield "whole", [data]
    if len(data) <= 4200:
        yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(len(data))
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, 7)))
        yield "random", [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# -- valid chunked bodies -------------------------------------------------------


@pytest.mark.parametrize("name", VALID)
def test_end_offset_matches_h11(name):
    body = VALID[name]
    assert h11_end(body + NEXT_RESPONSE) == len(body)
    for shape, pieces in splits(body + NEXT_RESPONSE):
        assert scan(pieces) == len(body), shape


@pytest.mark.parametrize("name", VALID)
def test_every_split_point(name):
    body = VALID[name]
    data = body + NEXT_RESPONSE
    step = 1 if len(data) < 2000 else 97
    for cut in list(range(0, len(data) + 1, step)) + [len(body) - 1, len(body), len(body) + 1]:
        assert scan([data[:cut], data[cut:]]) == len(body), cut


@pytest.mark.parametrize("name", VALID)
def test_without_trailing_bytes_the_offset_is_the_length(name):
    body = VALID[name]
    assert scan([body]) == len(body)
    assert scan([body[:-1]]) == -1


def test_zero_copy_inputs():
    body = VALID["trailers"]
    data = bytearray(body + NEXT_RESPONSE)
    view = memoryview(data)
    assert scan([view[:7], view[7:]]) == len(body)
    assert scan([data]) == len(body)


def test_bytes_seen_and_done():
    body = VALID["one_chunk"]
    scanner = BodyScanner()
    scanner.expect_chunked()
    assert not scanner.done
    assert scanner.feed(body[:6]) == -1
    assert scanner.bytes_seen == 6
    assert scanner.feed(body[6:] + b"extra") == len(body) - 6
    assert scanner.done
    assert scanner.bytes_seen == len(body)
    assert scanner.feed(b"anything") == 0  # the body already ended


def test_at_chunk_boundary():
    body = b"5\r\nhello\r\n3;x\r\nabc\r\n0\r\n\r\n"
    boundaries = {0, 10, 20}  # before "5", before "3;x", before "0"
    scanner = BodyScanner()
    assert not scanner.at_chunk_boundary  # nothing expected yet
    scanner.expect_chunked()
    seen = set()
    for offset in range(len(body)):
        if scanner.at_chunk_boundary:
            seen.add(offset)
        scanner.feed(body[offset : offset + 1])
    assert seen == boundaries
    assert scanner.done and not scanner.at_chunk_boundary
    scanner.expect_length(3)
    assert not scanner.at_chunk_boundary


@pytest.mark.parametrize("good, bad, boundary", [
    (b"", b"zz\r\n", True),                         # malformed before any chunk
    (b"5\r\nhello\r\n", b"zz\r\n", True),           # after a whole chunk
    (b"5\r\nhello\r\n", b"3\r\nabcXY", True),       # this piece began between chunks
    (b"5\r\nhel", b"loXY", False),                  # the forwarded bytes end mid-chunk
    (b"5\r", b"\nhelloXY", False),                  # ... or mid size line
])
def test_at_chunk_boundary_after_a_malformed_piece(good, bad, boundary):
    # The piece that raised is not forwarded (olb/_relay.pyx): what the
    # client has ends where the pieces before it ended.
    scanner = BodyScanner()
    scanner.expect_chunked()
    if good:
        assert scanner.feed(good) == -1
    with pytest.raises(ValueError):
        scanner.feed(bad)
    assert scanner.at_chunk_boundary is boundary
    with pytest.raises(ValueError):
        scanner.feed(b"5\r\nhello\r\n")  # still failed: the answer stands
    assert scanner.at_chunk_boundary is boundary


def test_injected_final_chunk_at_a_boundary_is_valid_framing():
    # What the proxy does when the backend dies mid-stream: at a boundary,
    # append a last chunk of its own.  h11 must accept the result.
    body = VALID["ndjson"]
    cut = body.index(b"\r\n", body.index(b"\r\n") + 2) + 2  # after the first chunk
    scanner = BodyScanner()
    scanner.expect_chunked()
    assert scanner.feed(body[:cut]) == -1
    assert scanner.at_chunk_boundary
    forged = body[:cut] + b"0\r\n\r\n"
    assert h11_end(forged) == len(forged)


def test_scanner_is_reusable():
    scanner = BodyScanner()
    for _ in range(3):
        scanner.expect_chunked()
        assert scanner.feed(VALID["trailers"]) == len(VALID["trailers"])
        scanner.expect_length(4)
        assert scanner.feed(b"abcdef") == 4


def test_whitespace_before_extension_is_accepted():
    # RFC 9112 allows BWS before ";" (h11 does not, so not in VALID).
    assert scan([b"5 \t;x=1\r\nhello\r\n0\r\n\r\n"]) == 21


def test_largest_chunk_size_is_accepted():
    scanner = BodyScanner()
    scanner.expect_chunked()
    assert scanner.feed(b"4000000000000000\r\n" + b"x" * 100) == -1


def test_longest_lines_are_accepted():
    ext = b"5;" + b"a" * 4094 + b"\r\nhello\r\n0\r\n\r\n"  # size line: 4096 bytes
    assert scan([ext]) == len(ext)
    trailer = b"0\r\nX: " + b"v" * 4093 + b"\r\n\r\n"   # trailer line: 4096 bytes
    assert scan([trailer]) == len(trailer)


# -- malformed chunked bodies ---------------------------------------------------


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_raises_at_every_split(name):
    data, match = MALFORMED[name]
    messages = set()
    for shape, pieces in splits(data):
        with pytest.raises(ValueError, match=match) as info:
            scan(pieces)
        messages.add(str(info.value))
    assert len(messages) == 1, messages  # same byte blamed however it arrived
    assert "malformed chunked body" in messages.pop()


def test_error_sticks_until_the_next_expect():
    scanner = BodyScanner()
    scanner.expect_chunked()
    with pytest.raises(ValueError, match="body byte 1"):
        scanner.feed(b"5g")
    with pytest.raises(ValueError, match="body byte 1"):
        scanner.feed(b"\r\n")
    scanner.expect_chunked()
    assert scanner.feed(b"0\r\n\r\n") == 5


def test_random_bodies_against_h11():
    rng = random.Random(1234)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(0, 6)):
            size = rng.choice([1, 2, 13, 120, 1000, rng.randint(1, 5000)])
            ext = rng.choice([b"", b";a", b";a=b", b';q="x y"'])
            parts.append(b"%X%s\r\n%s\r\n" % (size, ext, rng.randbytes(size)))
        trailers = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(rng.randint(0, 3)))
        body = b"".join(parts) + b"0\r\n" + trailers + b"\r\n"
        data = body + rng.randbytes(rng.randint(0, 40))
        assert h11_end(data) == len(body)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 20))))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert scan(pieces) == len(body)


def test_mutated_bodies_never_end_where_h11_does_not():
    # Replace one byte of a valid body.  We may be stricter than h11 (raise
    # where it accepts a bare LF in trailers, say), but whenever we find an
    # end h11 must find the same one: the client parses the same bytes, and a
    # different end would desynchronise its connection from ours.  (The one
    # form we accept and h11 refuses, whitespace before ";", cannot arise
    # from a one-byte substitution of these bodies.)
    rng = random.Random(99)
    agreed = 0
    for _ in range(3000):
        base = rng.choice(list(VALID.values()))
        data = bytearray(base + NEXT_RESPONSE)
        pos = rng.randrange(len(base))
        data[pos] = rng.choice(b"0123456789abcdefxX;= \t\r\n" + bytes([rng.randrange(256)]))
        data = bytes(data)
        try:
            ours = scan([data])
        except ValueError:
            continue
        theirs = h11_end(data)
        if ours >= 0:
            assert ours == theirs, data
            agreed += 1
        else:
            assert theirs is None, data
    assert agreed > 100


# -- Content-Length and read-until-close ----------------------------------------


def test_content_length():
    scanner = BodyScanner()
    scanner.expect_length(10)
    assert scanner.feed(b"0123") == -1
    assert scanner.feed(memoryview(b"456789NEXT")) == 6
    assert scanner.done and scanner.bytes_seen == 10
    scanner.expect_length(10)
    for i in range(9):
        assert scanner.feed(b"x") == -1
    assert scanner.feed(b"x") == 1


def test_content_length_exact_and_every_split():
    data = b"abcdefghij" + NEXT_RESPONSE
    for cut in range(len(data) + 1):
        scanner = BodyScanner()
        scanner.expect_length(10)
        first = scanner.feed(data[:cut])
        if cut >= 10:
            assert first == 10
        else:
            assert first == -1
            assert scanner.feed(data[cut:]) == 10 - cut


def test_zero_length_is_done_at_once():
    scanner = BodyScanner()
    scanner.expect_length(0)
    assert scanner.done
    assert scanner.feed(NEXT_RESPONSE) == 0
    with pytest.raises(ValueError, match=">= 0"):
        scanner.expect_length(-1)


def test_close_delimited_never_ends():
    scanner = BodyScanner()
    scanner.expect_close()
    assert scanner.feed(b"0\r\n\r\n") == -1
    assert scanner.feed(b"x" * 100) == -1
    assert not scanner.done
    assert scanner.bytes_seen == 105


def test_feed_before_expect_is_a_usage_error():
    with pytest.raises(RuntimeError, match="expect"):
        BodyScanner().feed(b"0\r\n\r\n")


def test_feed_rejects_non_buffers():
    scanner = BodyScanner()
    scanner.expect_chunked()
    with pytest.raises(TypeError):
        scanner.feed("0\r\n\r\n")
