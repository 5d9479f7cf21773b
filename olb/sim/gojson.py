"""Go's JSON, as Ollama's clients see it: encoding quirks and decoder errors.

Why: the simulator must answer bad input with the texts Ollama's handlers
produce (server/routes.go: malformed JSON or a wrong field type -> 400 with
the Go decoder's text, err.Error() of c.ShouldBindJSON), and encode like Go's json.Marshal so byte comparisons with real
Ollama fixtures hold.

Encoding (encoding/json): `<`, `>`, `&`, U+2028 and U+2029 are escaped as
\\u003c, \\u003e, \\u0026, \\u2028, \\u2029 (HTML-safe by default); map keys
are sorted.  orjson does neither, so `go_dumps` post-processes -- safe on the
serialised bytes because those characters can only occur inside strings.

Decoding (gin's ShouldBindJSON = json.NewDecoder(body).Decode(&req)):
* empty or whitespace-only body -> io.EOF (handlers say "missing request
  body"; the /v1 middleware passes "EOF" through);
* only the first JSON value is read: trailing bytes are ignored;
* syntax errors read "invalid character 'x' looking for beginning of value"
  (the scanner's texts are reproduced by `_scan` below); a value cut short
  reads "unexpected EOF";
* keys match struct fields case-insensitively; unknown keys are ignored;
* a wrong type reads "json: cannot unmarshal string into Go struct field
  GenerateRequest.prompt of type string"-like text, and decoding goes on, the
  first such error winning; null is always accepted.
"""

from __future__ import annotations

import orjson

_HTML_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def _go_escape(data: bytes) -> bytes:
    for raw, esc in _HTML_ESCAPES:
        if raw in data:
            data = data.replace(raw, esc)
    return data


def go_dumps(obj, sort_keys: bool = False) -> bytes:
    """json.Marshal(obj): compact, HTML-escaped, maps sorted when asked."""
    return _go_escape(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS if sort_keys else 0))


def go_string(s: str) -> bytes:
    """A Go-encoded JSON string literal, quotes included."""
    return _go_escape(orjson.dumps(s))


def go_quote(s: str) -> str:
    """fmt's %q for the plain strings we quote (model names, digests)."""
    return orjson.dumps(s).decode()


class DecodeError(Exception):
    """The body did not decode; str(exc) is Go's error text."""


class EmptyBody(DecodeError):
    """io.EOF: no JSON value at all."""

    def __init__(self):
        super().__init__("EOF")


# --- the struct schemas ------------------------------------------------------
# A field type is one of "string", "bool", "int", "float", "object", "any",
# "duration", "think", ("array", elem) or ("struct", Struct).  The Go type
# names are only for error texts.

_GO_TYPE = {"string": "string", "bool": "bool", "int": "int", "float": "float64",
            "object": "map[string]interface {}"}


class Struct:
    """A Go struct's JSON fields: json name -> field type."""

    __slots__ = ("name", "package", "fields", "_fold")

    def __init__(self, name: str, package: str, fields: dict):
        self.name = name
        self.package = package
        self.fields = fields
        self._fold = {k.lower(): k for k in fields}

    def field(self, key: str):
        if key in self.fields:
            return key
        return self._fold.get(key.lower())


MESSAGE = Struct("Message", "api", {
    "role": "string", "content": "string", "thinking": "string", "images": ("array", "any"),
    "tool_calls": ("array", "any"), "tool_name": "string", "tool_call_id": "string",
})
OPTS = "object"
GENERATE = Struct("GenerateRequest", "api", {
    "model": "string", "prompt": "string", "suffix": "string", "system": "string",
    "template": "string", "context": ("array", "int"), "stream": "bool", "raw": "bool",
    "format": "any", "keep_alive": "duration", "images": ("array", "any"), "options": OPTS,
    "think": "think", "truncate": "bool", "shift": "bool", "logprobs": "bool",
    "top_logprobs": "int",
})
CHAT = Struct("ChatRequest", "api", {
    "model": "string", "messages": ("array", ("struct", MESSAGE)), "tools": ("array", "any"),
    "stream": "bool", "format": "any", "keep_alive": "duration", "options": OPTS,
    "think": "think", "truncate": "bool", "shift": "bool", "logprobs": "bool",
    "top_logprobs": "int",
})
EMBED = Struct("EmbedRequest", "api", {
    "model": "string", "input": "any", "truncate": "bool", "dimensions": "int",
    "keep_alive": "duration", "options": OPTS,
})
EMBEDDINGS = Struct("EmbeddingRequest", "api", {
    "model": "string", "prompt": "string", "keep_alive": "duration", "options": OPTS,
})
SHOW = Struct("ShowRequest", "api", {
    "model": "string", "system": "string", "template": "string", "verbose": "bool",
    "options": OPTS, "name": "string",
})
PULL = Struct("PullRequest", "api", {
    "model": "string", "insecure": "bool", "username": "string", "password": "string",
    "stream": "bool", "name": "string",
})
COPY = Struct("CopyRequest", "api", {"source": "string", "destination": "string"})
DELETE = Struct("DeleteRequest", "api", {"model": "string", "name": "string"})
CREATE = Struct("CreateRequest", "api", {
    "model": "string", "stream": "bool", "quantize": "string", "draft_quantize": "string",
    "from": "string", "remote_host": "string", "files": "object", "draft_files": "object",
    "adapters": "object", "template": "string", "license": "any", "system": "string",
    "parameters": "object", "messages": ("array", ("struct", MESSAGE)), "renderer": "string",
    "parser": "string", "requires": "string", "info": "object", "name": "string",
    "quantization": "string",
})
PUSH = Struct("PushRequest", "api", {
    "model": "string", "insecure": "bool", "username": "string", "password": "string",
    "stream": "bool", "name": "string",
})
OAI_MESSAGE = Struct("Message", "openai", {
    "role": "string", "content": "any", "reasoning": "string", "tool_calls": ("array", "any"),
    "name": "string", "tool_call_id": "string",
})
OAI_CHAT = Struct("ChatCompletionRequest", "openai", {
    "model": "string", "messages": ("array", ("struct", OAI_MESSAGE)), "stream": "bool",
    "stream_options": "object", "max_tokens": "int", "seed": "int", "stop": "any",
    "temperature": "float", "frequency_penalty": "float", "presence_penalty": "float",
    "top_p": "float", "response_format": "object", "tools": ("array", "any"),
    "reasoning": "object", "reasoning_effort": "string",
})
OAI_COMPLETION = Struct("CompletionRequest", "openai", {
    "model": "string", "prompt": "string", "frequency_penalty": "float", "max_tokens": "int",
    "presence_penalty": "float", "seed": "int", "stop": "any", "stream": "bool",
    "stream_options": "object", "temperature": "float", "top_p": "float", "suffix": "string",
})
OAI_EMBED = Struct("EmbedRequest", "openai", {
    "input": "any", "model": "string", "dimensions": "int", "encoding_format": "string",
})
RESPONSES = Struct("ResponsesRequest", "openai", {
    "model": "string", "background": "bool", "conversation": "any", "include": ("array", "string"),
    "input": "any", "instructions": "string", "max_output_tokens": "int", "reasoning": "object",
    "temperature": "float", "text": "object", "top_p": "float", "truncation": "string",
    "tools": ("array", "any"), "stream": "bool",
})
ANTHROPIC_MESSAGES = Struct("MessagesRequest", "anthropic", {
    "model": "string", "max_tokens": "int", "messages": ("array", "any"), "system": "any",
    "stream": "bool", "temperature": "float", "top_p": "float", "top_k": "int",
    "stop_sequences": ("array", "string"), "tools": ("array", "any"), "tool_choice": "object",
    "thinking": "object", "metadata": "object", "output_config": "object",
})


def _json_kind(v) -> str:
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "array"
    return "object"


def _go_type(t) -> str:
    if isinstance(t, tuple):
        if t[0] == "array":
            return "[]" + _go_type(t[1])
        return f"{t[1].package}.{t[1].name}"
    return {"any": "interface {}", "duration": "api.Duration", "think": "api.ThinkValue"}.get(t, _GO_TYPE.get(t, t))


class _Decoder:
    """Walks a parsed value against a Struct like encoding/json's decoder."""

    def __init__(self):
        self.error: str | None = None

    def _type_error(self, value, kind_text, struct: Struct, path: list, t):
        if self.error is None:
            self.error = (f"json: cannot unmarshal {kind_text} into Go struct field "
                          f"{struct.name}.{'.'.join(path)} of type {_go_type(t)}")

    def struct(self, obj: dict, s: Struct, path: list) -> dict:
        out = {}
        for key, value in obj.items():
            name = s.field(key)
            if name is None:
                continue
            out[name] = self.value(value, s.fields[name], s, path + [name])
        return out

    def value(self, v, t, struct: Struct, path: list):
        if v is None:
            return None
        if t == "any":
            return v
        if t == "duration":
            return parse_keep_alive(v)
        if t == "think":
            if isinstance(v, (bool, str)):
                return v
            raise DecodeError(f"invalid think value: {orjson.dumps(v).decode()}")
        kind = _json_kind(v)
        if isinstance(t, tuple):
            if t[0] == "array":
                if kind != "array":
                    self._type_error(v, kind, struct, path, t)
                    return None
                return [self.value(x, t[1], struct, path) for x in v]
            if kind != "object":
                self._type_error(v, kind, struct, path, t)
                return None
            return self.struct(v, t[1], path)
        expected = {"string": "string", "bool": "bool", "int": "number", "float": "number",
                    "object": "object"}[t]
        if kind != expected:
            self._type_error(v, kind, struct, path, t)
            return None
        if t == "int" and (isinstance(v, float) or not -2**63 <= v < 2**63):
            self._type_error(v, f"number {v}", struct, path, t)
            return None
        return v


def decode(body: bytes, schema: Struct) -> dict:
    """Decode a request body into the fields of `schema`, Go-style.

    Returns:
        The known fields present (keys canonicalised, unknown keys dropped).
    Raises:
        EmptyBody: no JSON value (Go's io.EOF).
        DecodeError: syntax error, truncated value, or a type mismatch, with
            Go's message as str(exc).
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = _slow_parse(body)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DecodeError(f"json: cannot unmarshal {_json_kind(value)} into Go value of type "
                          f"{schema.package}.{schema.name}")
    d = _Decoder()
    out = d.struct(value, schema, [])
    if d.error:
        raise DecodeError(d.error)
    return out


def _slow_parse(body: bytes):
    """orjson said no: find Go's verdict, or the first value if only
    trailing bytes (which Go's Decoder never reads) were the problem."""
    end = _scan(body)
    try:
        return orjson.loads(body[:end])
    except orjson.JSONDecodeError:
        # Go replaces invalid UTF-8 inside strings with U+FFFD.
        return orjson.loads(body[:end].decode("utf-8", "replace"))


_SPACE = b" \t\r\n"
_HEX = b"0123456789abcdefABCDEF"
_DIGITS = b"0123456789"


def _quote_char(c: int) -> str:
    """encoding/json quoteChar: the byte as a Go rune literal."""
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    esc = {7: "\\a", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t", 11: "\\v", 0x5C: "\\\\"}
    if c in esc:
        return f"'{esc[c]}'"
    if c < 0x20 or c == 0x7F:
        return f"'\\x{c:02x}'"
    if 0x80 <= c <= 0xA0 or c == 0xAD:
        return f"'\\u{c:04x}'"
    return f"'{chr(c)}'"


def _scan(data: bytes) -> int:
    """Go's scanner over the first JSON value of `data`.

    Returns the end offset of that value; raises EmptyBody / DecodeError with
    the texts of encoding/json's scanner and Decoder.readValue.
    """
    n = len(data)
    i = 0

    def err(pos, context):
        if pos >= n:
            raise DecodeError("unexpected EOF")
        raise DecodeError(f"invalid character {_quote_char(data[pos])} {context}")

    def skip(j):
        while j < n and data[j] in _SPACE:
            j += 1
        return j

    def literal(j, word):
        for k, ch in enumerate(word[1:], 1):
            if j + k >= n:
                raise DecodeError("unexpected EOF")
            if data[j + k] != ch:
                err(j + k, f"in literal {word.decode()} (expecting {_quote_char(ch)})")
        return j + len(word)

    def string(j):  # data[j] == '"'
        j += 1
        while True:
            if j >= n:
                raise DecodeError("unexpected EOF")
            c = data[j]
            if c == 0x22:
                return j + 1
            if c == 0x5C:
                j += 1
                if j >= n:
                    raise DecodeError("unexpected EOF")
                e = data[j]
                if e == ord("u"):
                    for k in range(1, 5):
                        if j + k >= n:
                            raise DecodeError("unexpected EOF")
                        if data[j + k] not in _HEX:
                            err(j + k, "in \\u hexadecimal character escape")
                    j += 5
                    continue
                if e not in b'bfnrt\\/"':
                    err(j, "in string escape code")
                j += 1
                continue
            if c < 0x20:
                err(j, "in string literal")
            j += 1

    def number(j):
        if data[j] == 0x2D:
            j += 1
            if j >= n:
                raise DecodeError("unexpected EOF")
            if data[j] not in _DIGITS:
                err(j, "in numeric literal")
        if data[j] == 0x30:
            j += 1
        else:
            while j < n and data[j] in _DIGITS:
                j += 1
        if j < n and data[j] == 0x2E:
            j += 1
            if j >= n:
                raise DecodeError("unexpected EOF")
            if data[j] not in _DIGITS:
                err(j, "after decimal point in numeric literal")
            while j < n and data[j] in _DIGITS:
                j += 1
        if j < n and data[j] in b"eE":
            j += 1
            if j < n and data[j] in b"+-":
                j += 1
            if j >= n:
                raise DecodeError("unexpected EOF")
            if data[j] not in _DIGITS:
                err(j, "in exponent of numeric literal")
            while j < n and data[j] in _DIGITS:
                j += 1
        return j

    def value(j, context="looking for beginning of value"):
        j = skip(j)
        if j >= n:
            raise DecodeError("unexpected EOF")
        c = data[j]
        if c == 0x7B:  # {
            j = skip(j + 1)
            if j < n and data[j] == 0x7D:
                return j + 1
            while True:
                j = skip(j)
                if j >= n:
                    raise DecodeError("unexpected EOF")
                if data[j] != 0x22:
                    err(j, "looking for beginning of object key string")
                j = skip(string(j))
                if j >= n:
                    raise DecodeError("unexpected EOF")
                if data[j] != 0x3A:
                    err(j, "after object key")
                j = skip(value(j + 1))
                if j >= n:
                    raise DecodeError("unexpected EOF")
                if data[j] == 0x2C:
                    j += 1
                    continue
                if data[j] == 0x7D:
                    return j + 1
                err(j, "after object key:value pair")
        if c == 0x5B:  # [
            j = skip(j + 1)
            if j < n and data[j] == 0x5D:
                return j + 1
            while True:
                j = skip(value(j))
                if j >= n:
                    raise DecodeError("unexpected EOF")
                if data[j] == 0x2C:
                    j += 1
                    continue
                if data[j] == 0x5D:
                    return j + 1
                err(j, "after array element")
        if c == 0x22:
            return string(j)
        if c == 0x2D or c in _DIGITS:
            return number(j)
        if c == ord("t"):
            return literal(j, b"true")
        if c == ord("f"):
            return literal(j, b"false")
        if c == ord("n"):
            return literal(j, b"null")
        err(j, context)

    i = skip(0)
    if i >= n:
        raise EmptyBody()
    return value(i)


# --- api.Duration (keep_alive) -----------------------------------------------

FOREVER = float("inf")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(v) -> float:
    """api.Duration.UnmarshalJSON: number = seconds, string = Go duration,
    negative = forever (returned as inf)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        kind = {dict: "map[string]interface {}", list: "[]interface {}", bool: "bool"}.get(type(v), "unknown")
        raise DecodeError(f"Unsupported type: '{kind}'")
    if isinstance(v, str):
        seconds = parse_go_duration(v)
    else:
        seconds = float(v)
    return FOREVER if seconds < 0 else seconds


def parse_go_duration(s: str) -> float:
    """time.ParseDuration, in seconds; ValueError texts as Go's."""
    orig = s
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise DecodeError(f"time: invalid duration {go_quote(orig)}")
    total = 0.0
    while s:
        if not (s[0] == "." or s[0].isdigit()):
            raise DecodeError(f"time: invalid duration {go_quote(orig)}")
        j = 0
        while j < len(s) and s[j].isdigit():
            j += 1
        pre = j > 0
        whole = s[:j]
        s = s[j:]
        frac = ""
        post = False
        if s.startswith("."):
            s = s[1:]
            j = 0
            while j < len(s) and s[j].isdigit():
                j += 1
            frac, s = s[:j], s[j:]
            post = j > 0
        if not pre and not post:
            raise DecodeError(f"time: invalid duration {go_quote(orig)}")
        j = 0
        while j < len(s) and not (s[j] == "." or s[j].isdigit()):
            j += 1
        if j == 0:
            raise DecodeError(f"time: missing unit in duration {go_quote(orig)}")
        unit, s = s[:j], s[j:]
        if unit not in _UNITS:
            raise DecodeError(f"time: unknown unit {go_quote(unit)} in duration {go_quote(orig)}")
        total += float(f"{whole or 0}.{frac or 0}") * _UNITS[unit]
    return -total if neg else total
