"""olb.http without sockets: request reading, head rewriting, response heads."""

import h11
import orjson
import pytest

from olb.errors import BackendProtocolError, BadRequest, PayloadTooLarge
from olb.http import (CHUNKED, CLOSED, LENGTH, NEED_DATA, NO_BODY, PAUSED, UNTIL_CLOSE, ProxyRequest,
                      RequestReader, downstream_head, error_body, error_response, parse_response_head,
                      stream_error_tail, upstream_head)

CHAT = (b"POST /api/chat HTTP/1.1\r\nHost: olb.example:11434\r\nContent-Type: application/json\r\n"
        b"Content-Length: 17\r\n\r\n{\"model\":\"llama\"}")


def feed_all(reader, data, mode):
    """Feed whole, byte by byte, or in two halves; collect what comes out."""
    if mode == "whole":
        pieces = [data]
    elif mode == "bytes":
        pieces = [data[i:i + 1] for i in range(len(data))]
    else:
        pieces = [data[: len(data) // 2], data[len(data) // 2:]]
    out = []
    for piece in pieces:
        reader.receive(piece)
        while True:
            r = reader.next_request()
            if r is NEED_DATA or r is PAUSED or r is CLOSED:
                break
            out.append(r)
    return out


@pytest.mark.parametrize("mode", ["whole", "bytes", "halves"])
def test_request_read_in_any_pieces(mode):
    reader = RequestReader(max_body=1024)
    [req] = feed_all(reader, CHAT, mode)
    assert req.method == b"POST" and req.target == b"/api/chat"
    assert req.body == b'{"model":"llama"}'
    assert req.keep_alive and req.has_body_framing
    assert req.header(b"content-type") == b"application/json"


def test_chunked_request_body_is_joined():
    reader = RequestReader(max_body=1024)
    data = (b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    [req] = feed_all(reader, data, "bytes")
    assert req.body == b"hello world"


def test_pipelined_requests_come_one_cycle_at_a_time():
    reader = RequestReader(max_body=1024)
    get = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n\r\n"
    reader.receive(get + CHAT)
    first = reader.next_request()
    assert first.target == b"/api/tags"
    assert reader.next_request() is PAUSED
    assert reader.finish_response(200, closing=False)
    second = reader.next_request()
    assert second.target == b"/api/chat"


def test_finish_response_reports_close():
    reader = RequestReader(max_body=1024)
    reader.receive(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    req = reader.next_request()
    assert not req.keep_alive
    assert reader.finish_response(200, closing=True) is False


def test_http10_request_is_not_keep_alive():
    reader = RequestReader(max_body=1024)
    reader.receive(b"GET / HTTP/1.0\r\n\r\n")
    req = reader.next_request()
    assert req.http_version == b"1.0" and not req.keep_alive
    assert reader.finish_response(200, closing=True) is False


def test_body_over_limit_by_content_length():
    reader = RequestReader(max_body=10)
    reader.receive(CHAT)
    with pytest.raises(PayloadTooLarge) as info:
        reader.next_request()
    assert info.value.status_hint == 413


def test_body_over_limit_by_chunks():
    reader = RequestReader(max_body=8)
    reader.receive(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n")
    with pytest.raises(PayloadTooLarge):
        while reader.next_request() is not NEED_DATA:
            pass


def test_malformed_request_is_400():
    reader = RequestReader(max_body=1024)
    reader.receive(b"NOT HTTP AT ALL\r\n\r\n")
    with pytest.raises(BadRequest) as info:
        reader.next_request()
    assert info.value.status_hint == 400


def test_oversized_head_is_431():
    reader = RequestReader(max_body=1024, max_head=1024)
    reader.receive(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
    with pytest.raises(BadRequest) as info:
        reader.next_request()
    assert info.value.status_hint == 431


def test_expect_100_continue_is_answered():
    reader = RequestReader(max_body=1024)
    reader.receive(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert reader.next_request() is NEED_DATA
    assert reader.take_output().startswith(b"HTTP/1.1 100 ")
    assert reader.take_output() == b""
    reader.receive(b"{}")
    assert reader.next_request().body == b"{}"


def _req(headers, body=b"", version=b"1.1", method=b"POST"):
    return ProxyRequest(method, b"/api/chat?x=1", version, headers, body, True, bool(body))


def test_upstream_head_rewrites_host_and_drops_hop_by_hop():
    req = _req([(b"host", b"olb.example"), (b"connection", b"keep-alive, x-secret"),
                (b"keep-alive", b"timeout=5"), (b"x-secret", b"1"), (b"transfer-encoding", b"chunked"),
                (b"authorization", b"Bearer k"), (b"x-forwarded-for", b"10.0.0.1"),
                (b"expect", b"100-continue")], body=b"{}")
    head = upstream_head(req, b"127.0.0.1:11435", b"127.0.0.9")
    # h11 in the role of the backend must accept what we send.
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + b"{}")
    event = conn.next_event()
    headers = dict(event.headers)
    assert event.target == b"/api/chat?x=1"
    assert headers[b"host"] == b"127.0.0.1:11435"
    assert headers[b"x-forwarded-for"] == b"10.0.0.1, 127.0.0.9"
    assert headers[b"x-forwarded-host"] == b"olb.example"
    assert headers[b"authorization"] == b"Bearer k"
    assert headers[b"content-length"] == b"2"
    for hop in (b"connection", b"keep-alive", b"x-secret", b"transfer-encoding", b"expect"):
        assert hop not in headers
    assert conn.next_event().data == b"{}"


def test_upstream_head_keeps_http10():
    head = upstream_head(_req([(b"host", b"a")], version=b"1.0", method=b"GET"), b"b:1", b"c")
    assert head.startswith(b"GET /api/chat?x=1 HTTP/1.0\r\nhost: b:1\r\n")
    assert b"content-length" not in head


def test_parse_response_head_framings():
    chunked = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n"
    head, size = parse_response_head(chunked, False)
    assert (head.status, head.framing, head.keep_alive) == (200, CHUNKED, True)
    assert head.content_type == b"application/x-ndjson"
    assert chunked[size:] == b"5\r\n"
    head, _ = parse_response_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 12\r\n\r\n", False)
    assert (head.status, head.framing, head.length, head.reason) == (404, LENGTH, 12, b"Not Found")
    head, _ = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n", False)
    assert head.framing == UNTIL_CLOSE and not head.keep_alive
    head, _ = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True)
    assert head.framing == NO_BODY
    head, _ = parse_response_head(b"HTTP/1.1 204 No Content\r\n\r\n", False)
    assert head.framing == NO_BODY and head.keep_alive
    head, _ = parse_response_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False)
    assert not head.keep_alive and head.hop_by_hop
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Le", False) is None


@pytest.mark.parametrize("bad", [
    b"HTTZ/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 2x0 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    # Over 16 KiB: whole in one read, or not yet complete.
    b"HTTP/1.1 200 OK\r\n" + b"X-A: %s\r\n" % (b"y" * 16 * 1024) + b"Content-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-A: %s" % (b"y" * 16 * 1024),
])
def test_parse_response_head_rejects_garbage(bad):
    with pytest.raises(BackendProtocolError):
        parse_response_head(bad, False)


def test_downstream_head_passthrough_and_rebuild():
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    head, _ = parse_response_head(raw, False)
    assert downstream_head(head, raw, closing=False) is raw
    rebuilt = downstream_head(head, raw, closing=True)
    assert rebuilt.endswith(b"connection: close\r\n\r\n") and b"content-length: 2\r\n" in rebuilt
    raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n"
    head, _ = parse_response_head(raw, False)
    assert b"keep-alive" not in downstream_head(head, raw, closing=False).lower()


def test_error_shapes():
    assert orjson.loads(error_body(b"/api/chat", "boom", 503)) == {"error": "boom"}
    openai = orjson.loads(error_body(b"/v1/chat/completions", "nope", 404))
    assert openai["error"]["message"] == "nope" and openai["error"]["type"] == "not_found_error"
    # Anthropic's shape under /v1/messages (anthropic.NewError), OpenAI's
    # elsewhere under /v1/ (openai.NewError), Ollama's own under /api/.
    for status, kind in ((404, "not_found_error"), (503, "overloaded_error"), (429, "rate_limit_error"),
                         (502, "api_error")):
        doc = orjson.loads(error_body(b"/v1/messages", "m", status))
        assert doc["type"] == "error" and doc["error"] == {"type": kind, "message": "m"}
        assert doc["request_id"].startswith("req_") and len(doc["request_id"]) == 28
    assert orjson.loads(error_body(b"/v1/messages?beta=true", "m", 400))["error"]["type"] == "invalid_request_error"
    assert orjson.loads(error_body(b"/v1/messagesx", "m", 404))["error"]["type"] == "not_found_error"
    assert "type" not in orjson.loads(error_body(b"/v1/messagesx", "m", 404))
    assert orjson.loads(error_body(b"/v1/responses", "m", 404))["error"]["type"] == "not_found_error"
    resp = error_response(b"/api/generate", 503, "busy", retry_after=1)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(resp)
    event = conn.next_event()
    assert event.status_code == 503 and dict(event.headers)[b"retry-after"] == b"1"
    assert orjson.loads(conn.next_event().data) == {"error": "busy"}


@pytest.mark.parametrize("ctype,prefix", [(b"application/x-ndjson", b'{"error"'),
                                           (b"text/event-stream", b'data: {"error"')])
def test_stream_error_tail_is_valid_chunked(ctype, prefix):
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: " + ctype + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
    head, _ = parse_response_head(raw, False)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw + stream_error_tail(head, "backend died"))
    assert isinstance(conn.next_event(), h11.Response)
    data = conn.next_event().data
    assert data.startswith(prefix) and b"backend died" in data and data.endswith(b"\n")
    assert isinstance(conn.next_event(), h11.EndOfMessage)


BLOB = (b"POST /api/blobs/sha256:abc HTTP/1.1\r\nHost: olb\r\nContent-Length: 2000\r\n\r\n" + b"z" * 2000
        + b"GET /api/tags HTTP/1.1\r\nHost: olb\r\n\r\n")


@pytest.mark.parametrize("mode", ["whole", "bytes", "halves"])
def test_blob_upload_body_is_streamed_past_max_body(mode):
    from olb.http import END
    reader = RequestReader(max_body=100)
    data = BLOB
    pieces = ([data] if mode == "whole" else [data[i:i + 1] for i in range(len(data))] if mode == "bytes"
              else [data[:len(data) // 2], data[len(data) // 2:]])
    req, body, ended, after = None, [], False, []
    for piece in pieces:
        reader.receive(piece)
        if req is None:
            r = reader.next_request()
            if r is NEED_DATA:
                continue
            req = r
            assert req.streamed and req.body == b"" and reader.streaming
            assert reader.next_request() is PAUSED  # nothing else is parsed while the body streams
        while not ended:
            got = reader.next_body()
            if got is NEED_DATA:
                break
            if got is END:
                ended = True
                assert not reader.streaming
                assert reader.finish_response(201, False)
                break
            body.append(got)
        if ended:
            r = reader.next_request()
            if type(r) is ProxyRequest:
                after.append(r)
    assert req.target == b"/api/blobs/sha256:abc"
    assert b"".join(body) == b"z" * 2000
    assert [r.target for r in after] == [b"/api/tags"]


def test_blob_upload_answered_early_closes():
    reader = RequestReader(max_body=100)
    reader.receive(BLOB[:200])
    req = reader.next_request()
    assert req.streamed
    assert reader.finish_response(200, False) is False  # the rest of the body was never read


def test_blob_upload_cut_short_is_bad_request():
    reader = RequestReader(max_body=100)
    reader.receive(BLOB[:200])
    reader.next_request()
    while reader.next_body() is not NEED_DATA:
        pass
    reader.receive(b"")
    with pytest.raises(BadRequest):
        reader.next_body()


def test_contains_answers_as_in_does():
    """_http.contains (manage.stop_model's search) against `in`, on seeded random bytes."""
    import random

    from olb._http import contains

    rng = random.Random(7)
    for _ in range(3000):
        data = bytes(rng.choice(b"ab_ke") for _ in range(rng.randrange(0, 40)))
        needle = bytes(rng.choice(b"ab_ke") for _ in range(rng.randrange(0, 5)))
        for form in (data, bytearray(data), memoryview(data)):
            assert contains(form, needle) == (needle in data), (data, needle)
    assert contains(b'{"model":"m","keep_alive":0}', b"keep_alive")
    assert not contains(b'{"model":"m","prompt":"hi"}', b"keep_alive")


@pytest.mark.parametrize("target", [b"/api/chat", b"/api/chat?x=1", b"/?", b"?", b"/a?b?c", b"/%3F", b"",
                                    bytearray(b"/v1/models?x")])
def test_path_of_is_the_target_before_its_query(target):
    from olb._http import path_of
    path = path_of(target)
    assert path == target.partition(b"?")[0] and type(path) is type(target)
    if type(target) is bytes and b"?" not in target:
        assert path is target  # no copy in the usual case
