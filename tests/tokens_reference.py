"""The Python original of olb/_tokens.pyx: the reference its differential test holds it to.

Kept as it was in olb/metrics.py when the compiled reader replaced it
(tests/unit/test_tokens.py compares the two on a corpus and seeded mutations).
"""

import re

_INT = re.compile(rb"\d+")
#: Ollama's Metrics as api/types.go orders them (prompt_eval_count, prompt_eval_duration, eval_count, eval_duration).
_OLLAMA = re.compile(rb'"prompt_eval_count": ?(\d+)(?:,"prompt_eval_duration": ?\d+)?'
                     rb'(?:,"eval_count": ?(\d+))?(?:,"eval_duration": ?(\d+))?')
#: OpenAI's usage as openai/openai.go's Usage orders it.
_USAGE = re.compile(rb'"usage": ?\{"prompt_tokens": ?(\d+),"completion_tokens": ?(\d+)')


def _field(tail: bytes, name: bytes) -> int | None:
    """The integer after the last `"name":` in tail, or None.

    The needle starts with a quote, so `"eval_count":` does not match inside
    `"prompt_eval_count":`, and a quoted field name inside generated text is
    escaped (`\\"eval_count\\":`) and does not match either.
    """
    at = tail.rfind(name)
    if at < 0:
        return None
    m = _INT.match(tail, at + len(name) + (tail[at + len(name):at + len(name) + 1] == b" "))
    return int(m.group()) if m else None


def read_tokens(tail: bytes):
    """Token counts from the last bytes of a response body.

    Ollama's last NDJSON line (or its non-streamed answer) carries
    `prompt_eval_count`, `eval_count` and `eval_duration` (ns) (api/types.go
    Metrics); an OpenAI-compatible answer carries `usage` with
    `prompt_tokens` and `completion_tokens` (openai/openai.go Usage), in a
    stream only with stream_options.include_usage, in the chunk before
    `data: [DONE]`.

    Returns:
        (prompt tokens, generated tokens, generation seconds or None), or
        None when the tail has no count.
    """
    # The common shapes first, one search and one match each: Ollama's
    # Metrics in Go's field order, then OpenAI's usage.
    at = tail.rfind(b'"prompt_eval_count":')
    if at >= 0:
        m = _OLLAMA.match(tail, at)
        if m is not None and m.group(2) is not None:
            ns = m.group(3)
            return int(m.group(1)), int(m.group(2)), (int(ns) / 1e9 if ns else None)
    at = tail.rfind(b'"usage":')
    if at >= 0:
        m = _USAGE.match(tail, at)
        if m is not None:
            return int(m.group(1)), int(m.group(2)), None
    # Any other order or spacing.
    evaluated = _field(tail, b'"eval_count":')
    if evaluated is not None:
        ns = _field(tail, b'"eval_duration":')
        return _field(tail, b'"prompt_eval_count":') or 0, evaluated, (ns / 1e9 if ns else None)
    completion = _field(tail, b'"completion_tokens":')
    prompt = _field(tail, b'"prompt_tokens":')
    if completion is None and prompt is None:
        # /api/embed answers only prompt_eval_count.
        embedded = _field(tail, b'"prompt_eval_count":')
        return (embedded, 0, None) if embedded is not None else None
    return prompt or 0, completion or 0, None


#: Bytes at a response's end searched for token counts: Ollama's last line
#: puts its Metrics last (~200 bytes), an OpenAI stream its usage chunk
#: (~250 bytes) before `data: [DONE]`; a large answer (embeddings) is not scanned.
TAIL_BYTES = 1024


def response_tokens(tail2, tail1, last: bytes):
    """read_tokens over the last TAIL_BYTES of a body: the relay's last two
    reads before the end (or None) and the final read's body bytes."""
    if len(last) < TAIL_BYTES and (tail1 is not None or tail2 is not None):
        last = b"".join(((tail2 or b"")[-TAIL_BYTES:], (tail1 or b"")[-TAIL_BYTES:], last))
    return read_tokens(last[-TAIL_BYTES:])


