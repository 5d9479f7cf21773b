"""Streams that survive their backend: what to send where when a chat stream breaks.

Rules for this module: sans-IO. It reads the bytes a broken stream already
forwarded, builds the request that continues it, and rewrites the new
stream where the client would otherwise see the seam. No sockets, no
Exchange; proxy.Exchange does the wiring (docs/operations.md, "Streams that
survive their backend").

Theory of operation
===================

A chat stream (`/api/chat` NDJSON, `/v1/chat/completions` SSE) whose
backend dies after the first byte cannot be retried: the client already has
part of the answer. It can be continued. Ollama renders a conversation that
ends with an assistant message as that message still being written: in
template.Execute (template/template.go) the legacy path cuts the template
right after the last assistant message's `{{ .Response }}`, so the prompt
ends inside the assistant turn; the library's `.Messages` templates do the
same with `$last` (qwen3's, as thinking/template_test.go quotes it:
`{{ if not $last }}<|im_end|>`), and the Go renderers leave a trailing assistant message open for it
(model/renderers/cohere.go: "Assistant prefill: leave the text open for
continuation"), their parsers told by ChatHandler (server/routes.go:
"Determine last message for chat prefill").  Ollama itself continues a turn
that way: ChatHandler appends an assistant message and renders again with
chatPrompt (server/prompt.go) to restart a generation for structured
outputs.  A template that closes every turn (the fallback
template/llama3-instruct.gotmpl) would have the model start a new turn
instead: docs/operations.md names that limit.

So olb sends the same request to another backend with one more message: the
text the client has seen, as the assistant's.  The new backend generates
only what follows it, and its stream is spliced into the client's:

    kept bytes -> read_progress -> Progress (text, tokens, finished, id)
    request body + Progress -> continuation_body -> the new request
    new stream -> as it is (NDJSON) / SseSplice (SSE: the first stream's id)

While a stream is healthy none of this runs: the relay (olb/_relay.pyx)
only keeps references to the bytes objects it forwards, up to
OLB_RESUME_MAX_BYTES; they are joined and parsed here only on a failure.

What a stream must look like to be continued (anything else ends the way a
broken stream always did, with an error line):

- it stopped at the end of a line (NDJSON) or event (SSE), on a chunk
  boundary of the client's body;
- every line so far is plain text: no `thinking`, no tool calls, no error;
- the request has no `format` / JSON `response_format` (a grammar constrains
  the whole answer from its first token, not a continuation) and no `tools`.
"""

from __future__ import annotations

import re

import orjson

NDJSON = 1
SSE = 2

#: The endpoints whose streams are continued, and the shape of each.
RESUMABLE = {b"/api/chat": NDJSON, b"/v1/chat/completions": SSE}

_CONTENT_TYPES = {NDJSON: b"application/x-ndjson", SSE: b"text/event-stream"}

#: The end of a chunked body.
LAST_CHUNK = b"0\r\n\r\n"


class Tally:
    """Chat streams cut by their backend, and those of them that reached
    their end without an error line (continued, or only the end was
    missing). Per worker, in /olb/status as `resume`."""

    __slots__ = ("cut", "resumed")

    def __init__(self):
        self.cut = 0
        self.resumed = 0

    def as_dict(self) -> dict:
        return {"cut": self.cut, "resumed": self.resumed}


def stream_kind(path: bytes, content_type: bytes) -> int:
    """NDJSON or SSE when a response on `path` with this Content-Type is a
    chat stream olb can continue, else 0."""
    kind = RESUMABLE.get(path, 0)
    if kind and content_type.startswith(_CONTENT_TYPES[kind]):
        return kind
    return 0


class Progress:
    """What the client of a broken stream has received.

    text:     the assistant's text so far (the contents joined)
    tokens:   lines or events that carried text (Ollama streams one per
              generated token)
    finished: the answer is complete (the final line, or a finish_reason,
              was forwarded): the stream only lacks its end
    done:     SSE only: `data: [DONE]` was forwarded
    id, created: SSE only: the first event's, which the continuation keeps
    """

    __slots__ = ("text", "tokens", "finished", "done", "id", "created")

    def __init__(self, text: str = "", tokens: int = 0, finished: bool = False, done: bool = False,
                 id: str | None = None, created: int | None = None):
        self.text = text
        self.tokens = tokens
        self.finished = finished
        self.done = done
        self.id = id
        self.created = created

    def __repr__(self):
        return (f"Progress(text={self.text!r}, tokens={self.tokens}, finished={self.finished}, "
                f"done={self.done}, id={self.id!r}, created={self.created!r})")


def dechunk(wire: bytes) -> bytes | None:
    """The payload of a chunked body read up to a chunk boundary.

    Returns None when `wire` does not end between chunks or is malformed
    (the scanner in front already rejected malformed framing; this is the
    one place that reads the payload back). A last chunk ends the payload;
    what follows it (trailers) is ignored.
    """
    out = []
    pos, n = 0, len(wire)
    while pos < n:
        eol = wire.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(wire[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            return None
        if size == 0:
            break
        start = eol + 2
        end = start + size
        if end + 2 > n or wire[end:end + 2] != b"\r\n":
            return None
        out.append(wire[start:end])
        pos = end + 2
    return b"".join(out)


def read_progress(kind: int, kept: list) -> Progress | None:
    """Read the body bytes a stream forwarded (as the relay kept them).

    Args:
        kind: NDJSON or SSE.
        kept: the bytes objects forwarded, in order, chunk framing
            included; a None in it means the stream outgrew
            OLB_RESUME_MAX_BYTES and was not kept whole.

    Returns:
        A Progress, or None when the stream cannot be continued (see the
        module doc).
    """
    if None in kept:
        return None
    payload = dechunk(b"".join(kept))
    if payload is None:
        return None
    if kind == NDJSON:
        return _ndjson_progress(payload)
    return _sse_progress(payload)


def _ndjson_progress(payload: bytes) -> Progress | None:
    if payload and not payload.endswith(b"\n"):
        return None  # cut inside a line
    parts = []
    tokens = 0
    finished = False
    for line in payload.split(b"\n"):
        if not line.strip():
            continue
        if finished:
            return None  # something after the final line
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or "error" in doc:
            return None
        message = doc.get("message")
        if message is not None:
            if not isinstance(message, dict) or message.get("thinking") or message.get("tool_calls"):
                return None
            content = message.get("content")
            if content:
                if not isinstance(content, str):
                    return None
                parts.append(content)
                tokens += 1
        if doc.get("done") is True:
            finished = True
    return Progress("".join(parts), tokens, finished)


def _sse_progress(payload: bytes) -> Progress | None:
    if payload and not payload.endswith(b"\n\n"):
        return None  # cut inside an event
    progress = Progress()
    parts = []
    for event in payload.split(b"\n\n"):
        if not event.strip():
            continue
        data = _event_data(event)
        if data is None:
            continue  # a comment or a field olb does not read: nothing the client shows
        if progress.done:
            return None
        if data == b"[DONE]":
            progress.done = progress.finished = True
            continue
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(doc, dict) or "error" in doc:
            return None
        if progress.id is None:
            progress.id = doc.get("id")
            progress.created = doc.get("created")
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict):
                return None
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict) or delta.get("tool_calls") or delta.get("reasoning"):
                return None
            content = delta.get("content")
            if content:
                if not isinstance(content, str):
                    return None
                parts.append(content)
                progress.tokens += 1
            if choice.get("finish_reason"):
                progress.finished = True
    progress.text = "".join(parts)
    return progress


def _event_data(event: bytes) -> bytes | None:
    """The `data:` of one SSE event (one line: Ollama writes one per event)."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


def end_of_stream(kind: int, progress: Progress) -> bytes:
    """The chunks that end a stream whose answer is complete (Progress.finished):
    its backend died after the final line and before the end of the body."""
    if kind == SSE and not progress.done:
        line = b"data: [DONE]\n\n"
        return b"%x\r\n%s\r\n%s" % (len(line), line, LAST_CHUNK)
    return LAST_CHUNK


def continuation_body(kind: int, body: bytes, progress: Progress) -> bytes | None:
    """The request that continues a stream on another backend.

    The original request with the text so far as the last assistant
    message: appended to the request's own last message when that is
    already the assistant's (Ollama's collate would join two in a row with
    a blank line between, which is not what the client saw), else a new
    message. The token budget (`options.num_predict`, `max_tokens` under
    /v1) shrinks by the tokens already streamed, to no less than 1.

    Returns:
        The new body, or None when the request cannot be continued: not a
        JSON object with a list of messages, or a `format` /
        `response_format` (json) or `tools`.
    """
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        return None
    if doc.get("tools"):
        return None
    if kind == NDJSON:
        if doc.get("format") not in (None, ""):
            return None
    else:
        fmt = doc.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            return None
    if not progress.text:
        return body  # nothing shown yet: the same request, unchanged
    messages = list(doc["messages"])
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant" and isinstance(last.get("content"), str) \
            and not last.get("tool_calls"):
        messages[-1] = dict(last, content=last["content"] + progress.text)
    else:
        messages.append({"role": "assistant", "content": progress.text})
    doc["messages"] = messages
    if kind == NDJSON:
        options = doc.get("options")
        if isinstance(options, dict):
            limit = _shrunk(options.get("num_predict"), progress.tokens)
            if limit is not None:
                doc["options"] = dict(options, num_predict=limit)
    else:
        limit = _shrunk(doc.get("max_tokens"), progress.tokens)
        if limit is not None:
            doc["max_tokens"] = limit
    return orjson.dumps(doc)


def _shrunk(limit, spent: int) -> int | None:
    """A positive token limit less what was spent (at least 1); None to leave it."""
    if type(limit) is float and limit.is_integer():
        limit = int(limit)
    if type(limit) is not int or limit <= 0:
        return None  # unset, unlimited (-1), or fill the context (-2)
    return max(1, limit - spent)


#: The head of a chat.completion.chunk as Ollama's ChatWriter marshals it
#: (openai.ChatCompletionChunk's field order: id, object, created, ...).
_CHUNK_HEAD = re.compile(rb'data: \{"id":"[^"\\]*","object":"chat\.completion\.chunk","created":-?\d+')


class SseSplice:
    """Rewrites the continuation of an SSE stream into the client's stream.

    The new backend's events carry its own completion id and `created`
    (ChatWriter draws `chatcmpl-<n>` per request and pins `created` to its
    first response); the client must see one completion, so each event gets
    the first stream's id and created. The id's length changes, so the
    chunks are re-framed: one chunk per batch of whole events, and the last
    chunk when the body ends. The client's body is therefore always at a
    chunk boundary between calls.

    feed() takes the new stream's body bytes as they come (chunk framing
    included, already checked by the relay's scanner) and returns the bytes
    for the client.
    """

    __slots__ = ("_head", "_wire", "_events", "ended")

    def __init__(self, id: str, created: int):
        self._head = b'data: {"id":' + orjson.dumps(id) + b',"object":"chat.completion.chunk","created":' + \
            b"%d" % created
        self._wire = b""
        self._events = b""
        #: The last chunk went out.
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        if self.ended:
            return b""
        wire = self._wire + data if self._wire else data
        payload = []
        pos, n = 0, len(wire)
        last = False
        while pos < n:
            eol = wire.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(wire[pos:eol].split(b";", 1)[0], 16)
            if size == 0:
                last = True
                break
            start = eol + 2
            end = start + size
            if end + 2 > n:
                break
            payload.append(wire[start:end])
            pos = end + 2
        self._wire = b"" if last else wire[pos:]
        out = []
        if payload:
            events = self._events + b"".join(payload) if self._events else b"".join(payload)
            cut = events.rfind(b"\n\n")
            if cut < 0:
                self._events = events
            else:
                self._events = events[cut + 2:]
                text = self._rewrite(events[:cut + 2])
                out.append(b"%x\r\n%s\r\n" % (len(text), text))
        if last:
            self.ended = True
            if self._events:  # a last event without its blank line: as it came
                out.append(b"%x\r\n%s\r\n" % (len(self._events), self._events))
                self._events = b""
            out.append(LAST_CHUNK)
        return b"".join(out)

    def _rewrite(self, events: bytes) -> bytes:
        head = self._head
        parts = []
        for event in events.split(b"\n\n")[:-1]:
            m = _CHUNK_HEAD.match(event)
            parts.append(head + event[m.end():] if m else event)
            parts.append(b"\n\n")
        return b"".join(parts)
