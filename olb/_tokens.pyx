# cython: language_level=3, embedsignature=True
"""olb's compiled token reader: the token counts at the end of a response body.

Theory of operation
===================

Every model response's token counts are read once, when it ends
(proxy.Exchange.on_end), for the metrics and the access log, the dashboard's
tokens per second and an API key's tpm= limit.  They are in the body's last
bytes: Ollama's last NDJSON line, or its non-streamed answer, carries
`prompt_eval_count`, `eval_count` and `eval_duration` (api/types.go Metrics,
in that order); an OpenAI-compatible answer carries `usage` with
`prompt_tokens` and `completion_tokens` (openai/openai.go Usage), in a
stream only with stream_options.include_usage, in the chunk before
`data: [DONE]`.

Written with Python's re, the read cost ~2.2 us a response (a regex match
over the line, its groups, three int() calls), more than anything else olb
did for a small request.  Here it is a backward search and a digit loop in
C: the same answers (tests/unit/test_tokens.py holds read_tokens to the
regex original, tests/tokens_reference.py, on a corpus and seeded
mutations of it).

The rules, in the order they are tried:

1. Go's field order: at the last `"prompt_eval_count":`, an optional space
   and digits, then optionally `,"prompt_eval_duration":` + digits,
   `,"eval_count":` + digits and `,"eval_duration":` + digits, each part
   skipped when it does not match whole.  With an eval count, that is the
   answer: (prompt, generated, eval_duration in seconds, or None without it).
2. OpenAI's usage: at the last `"usage":`, an optional space,
   `{"prompt_tokens":`, digits, `,"completion_tokens":`, digits.
3. Any other order or spacing: each field at its last occurrence (a quoted
   field name inside generated text is escaped, `\\"eval_count\\":`, and
   does not match).  `/api/embed` answers only `prompt_eval_count`.
"""

from libc.string cimport memcmp

cdef enum:
    # Digits read in C; a longer number (never a token count) goes to int().
    MAX_DIGITS = 18

#: Bytes at a response's end searched for token counts: Ollama's last line
#: puts its Metrics last (~200 bytes), an OpenAI stream its usage chunk
#: (~250 bytes) before `data: [DONE]`; a large answer (embeddings) is not scanned.
TAIL_BYTES = 1024

cdef bytes _PROMPT_EVAL_COUNT = b'"prompt_eval_count":'
cdef bytes _PROMPT_EVAL_DURATION = b',"prompt_eval_duration":'
cdef bytes _EVAL_COUNT_NEXT = b',"eval_count":'
cdef bytes _EVAL_DURATION_NEXT = b',"eval_duration":'
cdef bytes _USAGE = b'"usage":'
cdef bytes _USAGE_PROMPT = b'{"prompt_tokens":'
cdef bytes _USAGE_COMPLETION = b',"completion_tokens":'
cdef bytes _EVAL_COUNT = b'"eval_count":'
cdef bytes _EVAL_DURATION = b'"eval_duration":'
cdef bytes _COMPLETION_TOKENS = b'"completion_tokens":'
cdef bytes _PROMPT_TOKENS = b'"prompt_tokens":'


cdef Py_ssize_t _rfind(const unsigned char* p, Py_ssize_t n, bytes needle) noexcept:
    """Where the last `needle` starts in p[:n], or -1 (bytes.rfind)."""
    cdef const unsigned char* q = needle
    cdef Py_ssize_t m = len(needle)
    cdef Py_ssize_t i = n - m
    while i >= 0:
        if p[i] == q[0] and memcmp(p + i, q, m) == 0:
            return i
        i -= 1
    return -1


cdef inline bint _at(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos, bytes literal) noexcept:
    """Does p[:n] hold `literal` at pos?"""
    cdef Py_ssize_t m = len(literal)
    return pos + m <= n and memcmp(p + pos, <const unsigned char*>literal, m) == 0


cdef Py_ssize_t _digits_end(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos) noexcept:
    """The end of the run of ASCII digits at pos (pos itself when there is none)."""
    while pos < n and 48 <= p[pos] <= 57:
        pos += 1
    return pos


cdef object _number(object tail, const unsigned char* p, Py_ssize_t start, Py_ssize_t end):
    """The digits p[start:end] as an int."""
    cdef long long value = 0
    cdef Py_ssize_t i
    if end - start > MAX_DIGITS:
        return int(tail[start:end])
    for i in range(start, end):
        value = value * 10 + (p[i] - 48)
    return value


cdef Py_ssize_t _skip_space(const unsigned char* p, Py_ssize_t n, Py_ssize_t pos) noexcept:
    """pos past one optional space (the regexes' ` ?`)."""
    return pos + 1 if pos < n and p[pos] == 32 else pos


cdef object _field(object tail, const unsigned char* p, Py_ssize_t n, bytes name):
    """The integer after the last `name` in the tail (one optional space between), or None."""
    cdef Py_ssize_t at = _rfind(p, n, name)
    cdef Py_ssize_t start, end
    if at < 0:
        return None
    start = _skip_space(p, n, at + len(name))
    end = _digits_end(p, n, start)
    return _number(tail, p, start, end) if end > start else None


cpdef read_tokens(bytes tail):
    """Token counts from the last bytes of a response body (see the module doc).

    Returns:
        (prompt tokens, generated tokens, generation seconds or None), or
        None when the tail has no count.
    """
    cdef const unsigned char* p = tail
    cdef Py_ssize_t n = len(tail)
    cdef Py_ssize_t at, pos, start, end, g1s, g1e, g2s = -1, g2e = -1, g3s = -1, g3e = -1
    # 1. Ollama's Metrics in Go's field order.
    at = _rfind(p, n, _PROMPT_EVAL_COUNT)
    if at >= 0:
        g1s = _skip_space(p, n, at + len(_PROMPT_EVAL_COUNT))
        g1e = _digits_end(p, n, g1s)
        if g1e > g1s:
            pos = g1e
            if _at(p, n, pos, _PROMPT_EVAL_DURATION):
                start = _skip_space(p, n, pos + len(_PROMPT_EVAL_DURATION))
                end = _digits_end(p, n, start)
                if end > start:
                    pos = end
            if _at(p, n, pos, _EVAL_COUNT_NEXT):
                start = _skip_space(p, n, pos + len(_EVAL_COUNT_NEXT))
                end = _digits_end(p, n, start)
                if end > start:
                    g2s, g2e, pos = start, end, end
            if _at(p, n, pos, _EVAL_DURATION_NEXT):
                start = _skip_space(p, n, pos + len(_EVAL_DURATION_NEXT))
                end = _digits_end(p, n, start)
                if end > start:
                    g3s, g3e = start, end
            if g2s >= 0:
                return (_number(tail, p, g1s, g1e), _number(tail, p, g2s, g2e),
                        _number(tail, p, g3s, g3e) / 1e9 if g3s >= 0 else None)
    # 2. OpenAI's usage.
    at = _rfind(p, n, _USAGE)
    if at >= 0:
        pos = _skip_space(p, n, at + len(_USAGE))
        if _at(p, n, pos, _USAGE_PROMPT):
            g1s = _skip_space(p, n, pos + len(_USAGE_PROMPT))
            g1e = _digits_end(p, n, g1s)
            if g1e > g1s and _at(p, n, g1e, _USAGE_COMPLETION):
                g2s = _skip_space(p, n, g1e + len(_USAGE_COMPLETION))
                g2e = _digits_end(p, n, g2s)
                if g2e > g2s:
                    return _number(tail, p, g1s, g1e), _number(tail, p, g2s, g2e), None
    # 3. Any other order or spacing.
    evaluated = _field(tail, p, n, _EVAL_COUNT)
    if evaluated is not None:
        ns = _field(tail, p, n, _EVAL_DURATION)
        return _field(tail, p, n, _PROMPT_EVAL_COUNT) or 0, evaluated, (ns / 1e9 if ns else None)
    completion = _field(tail, p, n, _COMPLETION_TOKENS)
    prompt = _field(tail, p, n, _PROMPT_TOKENS)
    if completion is None and prompt is None:
        # /api/embed answers only prompt_eval_count.
        embedded = _field(tail, p, n, _PROMPT_EVAL_COUNT)
        return (embedded, 0, None) if embedded is not None else None
    return prompt or 0, completion or 0, None


cpdef response_tokens(tail2, tail1, bytes last):
    """read_tokens over the last TAIL_BYTES of a body: the relay's last two
    reads before the end (or None) and the final read's body bytes."""
    if len(last) < TAIL_BYTES and (tail1 is not None or tail2 is not None):
        last = b"".join(((tail2 or b"")[-TAIL_BYTES:], (tail1 or b"")[-TAIL_BYTES:], last))
    return read_tokens(last[-TAIL_BYTES:] if len(last) > TAIL_BYTES else last)
