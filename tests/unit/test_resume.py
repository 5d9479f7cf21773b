"""olb.resume: reading a broken chat stream back and continuing it (no sockets).

The proxy's integration tests (tests/integration/test_resume_functional.py) drive it
over real connections; these pin each rule on its own.
"""

import orjson
import pytest

from olb import resume
from olb.resume import NDJSON, SSE, Progress, SseSplice


def chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def line(content, done=False, **message) -> bytes:
    doc = {"model": "llama3.2", "created_at": "2026-01-01T00:00:00Z",
           "message": {"role": "assistant", "content": content, **message}, "done": done}
    if done:
        doc.update(done_reason="stop", eval_count=3)
    return orjson.dumps(doc) + b"\n"


def event(content=None, id="chatcmpl-7", created=1700000000, finish=None, **delta) -> bytes:
    d = dict(delta)
    if content is not None:
        d["content"] = content
    doc = {"id": id, "object": "chat.completion.chunk", "created": created, "model": "llama3.2",
           "system_fingerprint": "fp_ollama", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(doc) + b"\n\n"


# --- stream_kind -----------------------------------------------------------------------

@pytest.mark.parametrize("path,content_type,kind", [
    (b"/api/chat", b"application/x-ndjson", NDJSON),
    (b"/api/chat", b"application/x-ndjson; charset=utf-8", NDJSON),
    (b"/v1/chat/completions", b"text/event-stream", SSE),
    (b"/api/chat", b"application/json; charset=utf-8", 0),   # "stream": false
    (b"/v1/chat/completions", b"application/json", 0),
    (b"/api/generate", b"application/x-ndjson", 0),          # not continued (docs/operations.md)
    (b"/v1/completions", b"text/event-stream", 0),
])
def test_stream_kind(path, content_type, kind):
    assert resume.stream_kind(path, content_type) == kind


# --- dechunk -----------------------------------------------------------------------------

@pytest.mark.parametrize("wire,payload", [
    (b"", b""),
    (chunk(b"ab") + chunk(b"cde"), b"abcde"),
    (chunk(b"ab") + b"0\r\n\r\n", b"ab"),
    (b"2;ext=1\r\nab\r\n", b"ab"),                      # a chunk extension
    (chunk(b"ab") + b"3\r\ncd", None),                 # cut inside a chunk
    (chunk(b"ab") + b"3", None),                       # cut inside a size line
    (b"2\r\nabX\r\n", None),                           # no CRLF after the data
    (b"zz\r\nab\r\n", None),
])
def test_dechunk(wire, payload):
    assert resume.dechunk(wire) == payload


# --- read_progress -------------------------------------------------------------------------

def kept(*payloads, split=None):
    """The list the relay keeps: one bytes object per read (a read may hold several chunks)."""
    wire = b"".join(chunk(p) for p in payloads)
    if split is None:
        return [wire]
    return [wire[i:i + split] for i in range(0, len(wire), split)]


@pytest.mark.parametrize("parts,expect", [
    ([], ("", 0, False)),
    ([line("Hello"), line(" world")], ("Hello world", 2, False)),
    ([line(""), line("Hi")], ("Hi", 1, False)),                        # an empty line is no token
    ([line("Hi"), line("", done=True)], ("Hi", 1, True)),              # only the end was missing
    ([line("Hi") + line(" there")], ("Hi there", 2, False)),           # two lines in one chunk
    ([line("a \\\"quoted\\\" café")], ('a \\"quoted\\" café', 1, False)),
])
def test_ndjson_progress(parts, expect):
    for split in (None, 1, 7):
        p = resume.read_progress(NDJSON, kept(*parts, split=split))
        assert (p.text, p.tokens, p.finished) == expect


@pytest.mark.parametrize("kept_list", [
    [chunk(line("Hi")[:-5])],                                       # cut inside a line
    [chunk(line("Hi")), None],                                     # over OLB_RESUME_MAX_BYTES
    [chunk(line("Hi") + b'{"error":"boom"}\n')],                    # an error line
    [chunk(line("", thinking="hmm"))],                              # thinking: not continued
    [chunk(line("", tool_calls=[{"function": {"name": "f", "arguments": {}}}]))],
    [chunk(line("a", done=True) + line("b"))],                      # a line after the final one
    [chunk(b"not json\n")],
    [chunk(line("Hi")) + b"5\r\nab"],                               # cut inside a chunk
])
def test_ndjson_not_continued(kept_list):
    assert resume.read_progress(NDJSON, kept_list) is None


@pytest.mark.parametrize("parts,expect", [
    ([event("", role="assistant"), event("Hel"), event("lo")], ("Hello", 2, False, False)),
    ([event("Hi"), event(finish="stop")], ("Hi", 1, True, False)),
    ([event("Hi"), event(finish="stop"), b"data: [DONE]\n\n"], ("Hi", 1, True, True)),
    ([b": a comment\n\n", event("Hi")], ("Hi", 1, False, False)),
])
def test_sse_progress(parts, expect):
    for split in (None, 3):
        p = resume.read_progress(SSE, kept(*parts, split=split))
        assert (p.text, p.tokens, p.finished, p.done) == expect
        assert (p.id, p.created) == ("chatcmpl-7", 1700000000)


@pytest.mark.parametrize("parts", [
    [event("Hi")[:-1]],                                                           # cut inside an event
    [event("Hi"), b'data: {"error":{"message":"boom"}}\n\n'],
    [event(None, tool_calls=[{"id": "call_1", "function": {"name": "f", "arguments": "{}"}}])],
    [event("", reasoning="hmm")],
    [b"data: [DONE]\n\n", event("late")],
    [b"data: {nope\n\n"],
])
def test_sse_not_continued(parts):
    assert resume.read_progress(SSE, kept(*parts)) is None


# --- end_of_stream -----------------------------------------------------------------------

@pytest.mark.parametrize("kind,progress,tail", [
    (NDJSON, Progress("Hi", 1, True), b"0\r\n\r\n"),
    (SSE, Progress("Hi", 1, True, done=False), chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"),
    (SSE, Progress("Hi", 1, True, done=True), b"0\r\n\r\n"),
])
def test_end_of_stream(kind, progress, tail):
    assert resume.end_of_stream(kind, progress) == tail


# --- continuation_body ---------------------------------------------------------------------

ASK = [{"role": "user", "content": "why?"}]


@pytest.mark.parametrize("kind,request_doc,progress,expect", [
    # The text so far becomes the last assistant message.
    (NDJSON, {"model": "m", "messages": ASK}, Progress("Because", 1),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "Because"}]}),
    # The client's own prefill grows (collate would put a blank line between two).
    (NDJSON, {"model": "m", "messages": ASK + [{"role": "assistant", "content": "Well,"}]}, Progress(" because", 1),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "Well, because"}]}),
    # num_predict counts new tokens: what was streamed comes off it, down to 1.
    (NDJSON, {"model": "m", "messages": ASK, "options": {"num_predict": 10, "temperature": 0}}, Progress("a b c", 3),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "a b c"}],
      "options": {"num_predict": 7, "temperature": 0}}),
    (NDJSON, {"model": "m", "messages": ASK, "options": {"num_predict": 2}}, Progress("a b c", 3),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "a b c"}], "options": {"num_predict": 1}}),
    # -1 (no limit) and -2 (fill the context) stay.
    (NDJSON, {"model": "m", "messages": ASK, "options": {"num_predict": -1}}, Progress("a", 1),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "a"}], "options": {"num_predict": -1}}),
    (SSE, {"model": "m", "messages": ASK, "stream": True, "max_tokens": 20}, Progress("a b", 2),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "a b"}], "stream": True, "max_tokens": 18}),
    # Under /v1 an assistant message with content parts is not extended: a new one follows it.
    (SSE, {"model": "m", "messages": ASK + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]}]},
     Progress("y", 1),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": [{"type": "text", "text": "x"}]},
                                       {"role": "assistant", "content": "y"}]}),
    (SSE, {"model": "m", "messages": ASK, "response_format": {"type": "text"}}, Progress("y", 1),
     {"model": "m", "messages": ASK + [{"role": "assistant", "content": "y"}], "response_format": {"type": "text"}}),
    # Not continued:
    (NDJSON, {"model": "m", "messages": ASK, "format": "json"}, Progress("{", 1), None),
    (NDJSON, {"model": "m", "messages": ASK, "format": {"type": "object"}}, Progress("{", 1), None),
    (NDJSON, {"model": "m", "messages": ASK, "tools": [{"type": "function"}]}, Progress("a", 1), None),
    (SSE, {"model": "m", "messages": ASK, "response_format": {"type": "json_object"}}, Progress("{", 1), None),
    (SSE, {"model": "m", "messages": ASK, "tools": [{"type": "function"}]}, Progress("a", 1), None),
    (NDJSON, {"model": "m", "prompt": "x"}, Progress("a", 1), None),
    (NDJSON, ["not", "an", "object"], Progress("a", 1), None),
])
def test_continuation_body(kind, request_doc, progress, expect):
    body = resume.continuation_body(kind, orjson.dumps(request_doc), progress)
    assert (orjson.loads(body) if body is not None else None) == expect


def test_nothing_streamed_yet_sends_the_same_request():
    body = orjson.dumps({"model": "m", "messages": ASK, "options": {"num_predict": 5}})
    assert resume.continuation_body(NDJSON, body, Progress()) is body


def test_bad_json_is_not_continued():
    assert resume.continuation_body(NDJSON, b"{nope", Progress("a", 1)) is None


# --- SseSplice ---------------------------------------------------------------------------

def test_splice_gives_every_event_the_first_stream_id_and_reframes():
    second = b"".join(chunk(e) for e in (
        event("", id="chatcmpl-12", created=5, role="assistant"), event(" more", id="chatcmpl-12", created=5),
        event(finish="stop", id="chatcmpl-12", created=5))) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    expected = b"".join((event("", role="assistant"), event(" more"), event(finish="stop"), b"data: [DONE]\n\n"))
    # Fed whole, byte by byte, and in pieces that cut size lines and events.
    for step in (len(second), 1, 5, 37):
        splice = SseSplice("chatcmpl-7", 1700000000)
        out = b"".join(splice.feed(second[i:i + step]) for i in range(0, len(second), step))
        assert splice.ended and out.endswith(b"0\r\n\r\n")
        assert resume.dechunk(out) == expected
        # Only whole events go out, so the client's body is always at a chunk boundary.
        assert all(c.endswith(b"\n\n") for c in _chunks(out))
        assert splice.feed(b"anything after the end") == b""


def test_splice_leaves_events_it_does_not_know_as_they_are():
    other = b'data: {"error":{"message":"boom"}}\n\n'
    splice = SseSplice("chatcmpl-7", 1)
    assert resume.dechunk(splice.feed(chunk(other) + b"0\r\n\r\n")) == other


def test_splice_passes_a_last_event_without_its_blank_line():
    splice = SseSplice("chatcmpl-7", 1)
    out = splice.feed(chunk(b"data: [DONE]\n") + b"0\r\n\r\n")
    assert resume.dechunk(out) == b"data: [DONE]\n" and out.endswith(b"0\r\n\r\n")


def _chunks(wire: bytes) -> list:
    out, pos = [], 0
    while True:
        eol = wire.index(b"\r\n", pos)
        size = int(wire[pos:eol], 16)
        if size == 0:
            return out
        out.append(wire[eol + 2:eol + 2 + size])
        pos = eol + 4 + size
