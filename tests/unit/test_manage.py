"""olb.manage without sockets: classification, targets, progress merging, answer combining, the fan-out."""

import asyncio

import orjson
import pytest

from olb.manage import (BLOB_HEAD, BLOB_POST, COPY, CREATE, DELETE, PULL, PUSH, STOP, Fanout, ProgressMerger,
                        Result, classify, combine, create_needs, is_zero_keep_alive, lacking, model_name,
                        room_targets, stop_model, wants_stream)


@pytest.mark.parametrize("method, path, body, op", [
    (b"POST", b"/api/pull", b"{}", PULL),
    (b"POST", b"/api/push", b"{}", PUSH),
    (b"POST", b"/api/create", b"{}", CREATE),
    (b"POST", b"/api/copy", b"{}", COPY),
    (b"DELETE", b"/api/delete", b"{}", DELETE),
    (b"HEAD", b"/api/blobs/sha256:ab", b"", BLOB_HEAD),
    (b"POST", b"/api/blobs/sha256:ab", b"", BLOB_POST),
    (b"GET", b"/api/blobs/sha256:ab", b"", None),
    (b"GET", b"/api/pull", b"", None),           # gin's 405 comes from a backend
    (b"POST", b"/api/delete", b"{}", None),
    (b"POST", b"/api/generate", b'{"model":"m","keep_alive":0}', STOP),
    (b"POST", b"/api/chat", b'{"model":"m","messages":[],"keep_alive":"0s"}', STOP),
    (b"POST", b"/api/generate", b'{"model":"m","prompt":"hi","keep_alive":0}', None),
    (b"POST", b"/api/generate", b'{"model":"m"}', None),
    (b"POST", b"/api/tags", b"", None),
])
def test_classify(method, path, body, op):
    assert classify(method, path, body) == op


@pytest.mark.parametrize("value, zero", [
    (0, True), (0.0, True), (1e-10, True), ("0", True), ("0s", True), ("0m", True), ("0h0m0s", True),
    ("0.0s", True), ("-0s", True), ("+0ms", True), ("0µs", True),
    (1, False), (-1, False), ("5m", False), ("0.5s", False), ("10", False), ("", False), (None, False),
    (False, False), ([], False), ("-1", False), ("0x", False),
])
def test_zero_keep_alive(value, zero):
    assert is_zero_keep_alive(value) is zero


@pytest.mark.parametrize("path, body, model", [
    (b"/api/generate", {"model": "llama3.2", "keep_alive": 0}, "llama3.2"),
    (b"/api/generate", {"model": "llama3.2", "prompt": "", "keep_alive": 0}, "llama3.2"),
    (b"/api/generate", {"model": "llama3.2", "prompt": "x", "keep_alive": 0}, None),
    (b"/api/chat", {"model": "m", "keep_alive": 0}, "m"),
    (b"/api/chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "keep_alive": 0}, None),
    (b"/api/chat", {"model": "m", "keep_alive": 300}, None),
    (b"/api/chat", {"model": "", "keep_alive": 0}, None),
    (b"/api/chat", {"keep_alive": 0}, None),
    (b"/api/embed", {"model": "m", "keep_alive": 0}, None),
    (b"/api/generate", ["keep_alive"], None),
])
def test_stop_model(path, body, model):
    assert stop_model(path, orjson.dumps(body)) == model


def test_stop_model_does_not_parse_big_bodies():
    body = orjson.dumps({"model": "m", "keep_alive": 0, "images": ["a" * 100_000]})
    assert stop_model(b"/api/generate", body) is None
    assert stop_model(b"/api/generate", b"{not json keep_alive") is None


@pytest.mark.parametrize("doc, stream", [({}, True), ({"stream": True}, True), ({"stream": False}, False),
                                         ({"stream": None}, True)])
def test_wants_stream(doc, stream):
    assert wants_stream(doc) is stream


@pytest.mark.parametrize("op, doc, name", [
    (COPY, {"source": "Llama3.2", "destination": "x"}, "llama3.2:latest"),
    (DELETE, {"model": "library/qwen:7b"}, "qwen:7b"),
    (DELETE, {"name": "a"}, "a:latest"),
    (DELETE, {"model": ""}, None),
    (DELETE, {"model": 3}, None),
])
def test_model_name(op, doc, name):
    assert model_name(op, doc) == name


@pytest.mark.parametrize("doc, needs", [
    ({"model": "x", "from": "llama3.2"}, ("llama3.2:latest", [])),
    ({"model": "x", "files": {"a.gguf": "sha256:1"}, "adapters": {"b": "sha256:2"}}, (None, ["sha256:1", "sha256:2"])),
    ({"model": "x", "files": ["bad"]}, (None, [])),
    ({}, (None, [])),
])
def test_create_needs(doc, needs):
    assert create_needs(doc) == needs


@pytest.mark.parametrize("healthy, size, capacity, out", [
    ([0, 1, 2], None, [1, 1, 1], [0, 1, 2]),            # size unknown: everywhere
    ([0, 1, 2], 10, [None, None, None], [0, 1, 2]),     # GPU memory unknown: kept
    ([0, 1, 2], 10, [5, 10, None], [1, 2]),
    ([0, 2], 10, [5, 10, 20], [2]),                     # only healthy ones
    ([0, 1], 10, [5, 5], []),
])
def test_room_targets(healthy, size, capacity, out):
    assert room_targets(healthy, size, capacity) == out


@pytest.mark.parametrize("names, out", [
    ([{"a"}, {"a"}], {}),
    ([{"a", "b"}, {"a"}, set()], {"a": ["u2"], "b": ["u1", "u2"]}),
    ([{"a"}, None, {"b"}], {"a": ["u2"], "b": ["u0"]}),   # unknown catalogue: left out
    ([None, None, None], {}),
])
def test_lacking(names, out):
    assert lacking(names, ["u0", "u1", "u2"]) == out


def test_progress_merger_sums_layers_and_holds_success():
    m = ProgressMerger(2)
    steps = [
        (0, {"status": "pulling manifest"}, [{"status": "pulling manifest"}]),
        (1, {"status": "pulling manifest"}, []),
        (0, {"status": "pulling abc", "digest": "sha256:abc", "total": 100}, [
            {"status": "pulling abc", "digest": "sha256:abc", "total": 100}]),
        (1, {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 30}, [
            {"status": "pulling abc", "digest": "sha256:abc", "total": 200, "completed": 30}]),
        (0, {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 100}, [
            {"status": "pulling abc", "digest": "sha256:abc", "total": 200, "completed": 130}]),
        (0, {"status": "pulling def", "digest": "sha256:def", "total": 5, "completed": 5}, [
            {"status": "pulling def", "digest": "sha256:def", "total": 5, "completed": 5}]),
        (0, {"status": "success"}, []),
        (1, {"status": "pulling abc", "digest": "sha256:abc", "total": 100, "completed": 100}, [
            {"status": "pulling abc", "digest": "sha256:abc", "total": 200, "completed": 200}]),
        (1, {"status": "verifying sha256 digest"}, [{"status": "verifying sha256 digest"}]),
        (1, {"status": "success"}, []),
    ]
    for k, line, out in steps:
        assert m.feed(k, line) == out
    assert m.failures() == []


@pytest.mark.parametrize("events, failures", [
    ([("feed", 0, {"status": "success"}), ("feed", 1, {"error": "pull model manifest: file does not exist"})],
     [(1, "pull model manifest: file does not exist")]),
    ([("feed", 0, {"status": "success"}), ("end", 1, None)],
     [(1, "the backend closed the stream before it finished")]),
    ([("feed", 0, {"status": "success"}), ("fail", 0, "reset"), ("end", 1, None)],
     [(0, "reset"), (1, "the backend closed the stream before it finished")]),
    ([("feed", 0, {"error": "x"}), ("end", 0, None), ("feed", 1, {"status": "success"}), ("end", 1, None)],
     [(0, "x")]),
    ([("feed", 0, "not a dict"), ("end", 0, None), ("feed", 1, {"status": "success"})],
     [(0, "the backend closed the stream before it finished")]),
])
def test_progress_merger_outcomes(events, failures):
    m = ProgressMerger(2)
    for kind, k, arg in events:
        if kind == "feed":
            assert m.feed(k, arg) == []
        elif kind == "fail":
            m.fail(k, arg)
        else:
            m.end(k)
    assert m.failures() == failures


def R(i, status, body=b"", ctype=b"application/json"):
    return Result(i, f"http://b{i}", status, body, ctype)


NOT_FOUND = b'{"error":"model \'x\' not found"}'


@pytest.mark.parametrize("results, neutral, status, error", [
    ([R(0, 200), R(1, 404, NOT_FOUND)], (404,), 200, None),
    ([R(0, 404, NOT_FOUND), R(1, 404, NOT_FOUND)], (404,), 404, "model 'x' not found"),
    ([R(0, 200), R(1, 200)], (), 200, None),
    ([R(0, 400, b'{"error":"bad"}'), R(1, 400, b'{"error":"bad"}')], (), 400, "bad"),
    ([R(0, 200), R(1, 500, b'{"error":"disk full"}')], (404,), 500,
     "delete failed on 1 of 2 backends (http://b1: disk full); it succeeded on the other 1"),
    ([R(0, 200), Result(1, "http://b1", None, error="connect refused")], (404,), 502,
     "delete failed on 1 of 2 backends (http://b1: connect refused); it succeeded on the other 1"),
    ([R(0, 404, NOT_FOUND), R(1, 500, b'{"error":"disk full"}')], (404,), 500,
     "delete failed on 1 of 2 backends (http://b1: disk full)"),
    ([R(0, 400, b'{"error":"a"}'), R(1, 400, b'{"error":"b"}')], (), 500,
     "delete failed on 2 of 2 backends (http://b0: a; http://b1: b)"),
    ([], (), 502, "delete: no healthy backend"),
])
def test_combine(results, neutral, status, error):
    got_status, body, _ = combine("delete", results, neutral)
    assert got_status == status
    if error is None:
        assert body == results[0].body
    else:
        assert orjson.loads(body)["error"] == error


def test_fanout_goes_at_the_pace_of_the_slowest():
    events = []

    async def main():
        fan = Fanout(2, high=10, on_pause=lambda: events.append("pause"), on_resume=lambda: events.append("resume"))
        fast, slow = fan.branch(0), fan.branch(1)
        fan.feed(b"x" * 6)
        assert await fast.__anext__() == b"x" * 6
        fan.feed(b"y" * 6)                      # slow holds 12 > 10
        assert events == ["pause"] and fan.paused
        assert await fast.__anext__() == b"y" * 6
        assert fan.paused                       # the fast one alone does not resume it
        assert await slow.__anext__() == b"x" * 6
        assert fan.paused                       # 6 > 10 // 4
        assert await slow.__anext__() == b"y" * 6
        assert events == ["pause", "resume"] and not fan.paused
        fan.finish()
        assert [p async for p in fast] == [] and [p async for p in slow] == []

    asyncio.run(main())


def test_fanout_drop_and_abort():
    async def main():
        fan = Fanout(2, high=4)
        a = fan.branch(0)
        fan.feed(b"12345")
        assert fan.paused
        fan.drop(1)                             # a failed consumer no longer holds it back
        assert fan.paused                       # branch 0 still holds 5
        assert await a.__anext__() == b"12345"
        assert not fan.paused
        waiting = asyncio.ensure_future(a.__anext__())
        await asyncio.sleep(0)
        fan.abort()
        with pytest.raises(ConnectionAbortedError):
            await waiting

    asyncio.run(main())
