# cython: language_level=3, embedsignature=True, boundscheck=False, wraparound=False
"""olb's compiled request-body reader: the members routing reads, found without decoding the body.

Theory of operation
===================

Routing reads four members of a JSON request body (models.parse_request):
`model` (or `name`, its deprecated alias on /api/show), `options` and
`messages`.  Decoding the whole body with orjson to read them cost ~4,000
instructions for a 90-byte `POST /api/generate` (the document's dict, its
strings and numbers, built and then freed), the largest single cost of a
small proxied request; a 20 MB body of base64 images cost tens of
milliseconds.  Here the body's top-level object is stepped through in C:

- a string's end is found with memchr (a 20 MB base64 string is one call),
  a quote preceded by an odd run of backslashes being escaped;
- a container's end by counting brackets outside strings;
- a scalar's end at the next `,`, `]`, `}` or whitespace.

Only what routing needs is made into objects: the model's name (a plain
string decoded from UTF-8 in place; one with escapes or control characters
through orjson, which applies JSON's rules), and the `options` and
`messages` values as spans of the body, for models.py to decode when they
matter: `options` only when it names a runner option (so that the usual
`{"num_predict": 16}` decodes nothing), `messages` when there is one.

Key matching follows Go's encoding/json, which decodes the request into
Ollama's structs (server/routes.go GenerateHandler, ChatHandler:
`c.ShouldBindJSON(&req)`): a key matches a field's name ignoring ASCII case
(`"Model"` is `model`), and of repeated keys the last wins.  (Go also folds
the two non-ASCII letters K and ſ to k and s; a client that spells `model`
with them is not served.)  The keys inside `options` are a map's in Go
(api.Options.FromMap reads the exact names) and are matched exactly.

A body the scan cannot step through (not an object, a string left open, a
missing comma or colon, bytes after the object) raises ValueError, and
routing reads nothing from it: the backend answers Ollama's 400.  The scan
does not check what it steps over (a number's digits, a nested object's
commas): for a body malformed only there, routing uses the model it found,
and the backend still answers 400; where olb would answer itself (a model no
backend has: proxy.Exchange._route) it checks the whole body first, as
Ollama binds the whole request before looking its model up.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.string cimport memchr, memcmp

import orjson

cdef object _loads = orjson.loads


cdef struct Member:
    # A member of an object, as offsets into the body: its key (between the
    # quotes) and its value [value0, value1).
    Py_ssize_t key0
    Py_ssize_t key1
    Py_ssize_t value0
    Py_ssize_t value1


cdef inline Py_ssize_t _ws(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n) noexcept:
    """The first position at or after pos that is not JSON whitespace."""
    cdef unsigned char c
    while pos < n:
        c = b[pos]
        if c != 0x20 and c != 0x0A and c != 0x0D and c != 0x09:
            break
        pos += 1
    return pos


cdef Py_ssize_t _string_end(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n) except -1:
    """The position after the string that opens at pos (b[pos] is its quote)."""
    cdef const unsigned char* q
    cdef Py_ssize_t start = pos + 1, end, back
    while start < n:
        q = <const unsigned char*>memchr(b + start, 0x22, n - start)
        if q == NULL:
            break
        end = q - b
        back = end - 1
        while b[back] == 0x5C:  # stops at the opening quote at the latest
            back -= 1
        if (end - 1 - back) % 2 == 0:  # an even run of backslashes escapes only itself
            return end + 1
        start = end + 1
    raise ValueError("unterminated JSON string")


cdef Py_ssize_t _value_end(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n) except -1:
    """The position after the value that starts at pos."""
    cdef unsigned char c
    cdef Py_ssize_t start = pos, depth = 0
    if pos >= n:
        raise ValueError("expected a JSON value")
    c = b[pos]
    if c == 0x22:  # "
        return _string_end(b, pos, n)
    if c != 0x5B and c != 0x7B:  # a scalar: true, 12.5e3, null...
        while pos < n:
            c = b[pos]
            if c == 0x2C or c == 0x5D or c == 0x7D or c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09:
                break
            pos += 1
        if pos == start:
            raise ValueError("expected a JSON value")
        return pos
    while pos < n:
        c = b[pos]
        if c == 0x22:
            pos = _string_end(b, pos, n)
            continue
        if c == 0x5B or c == 0x7B:
            depth += 1
        elif c == 0x5D or c == 0x7D:
            depth -= 1
            if depth == 0:
                return pos + 1
        pos += 1
    raise ValueError("unterminated JSON value")


cdef Py_ssize_t _open(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n, unsigned char bracket) except -2:
    """Past the opening bracket at pos: where the first member (or element)
    starts, or -1 for an empty container."""
    pos = _ws(b, pos, n)
    if pos >= n or b[pos] != bracket:
        raise ValueError("not a JSON object" if bracket == 0x7B else "not a JSON array")
    pos = _ws(b, pos + 1, n)
    if pos < n and b[pos] == bracket + 2:  # { + 2 is }, [ + 2 is ]
        return -1
    return pos


cdef Py_ssize_t _next(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n, unsigned char close) except -2:
    """After a member (or element) that ends at pos: where the next one
    starts, or -1 at the container's closing bracket."""
    pos = _ws(b, pos, n)
    if pos < n:
        if b[pos] == close:
            return -1
        if b[pos] == 0x2C:
            return _ws(b, pos + 1, n)
    raise ValueError("expected ',' or the closing bracket")


cdef Py_ssize_t _member(const unsigned char* b, Py_ssize_t pos, Py_ssize_t n, Member* m) except -2:
    """Reads the member at pos into m; answers as _next does."""
    cdef Py_ssize_t end
    if pos >= n or b[pos] != 0x22:
        raise ValueError("expected a key")
    end = _string_end(b, pos, n)
    m.key0 = pos + 1
    m.key1 = end - 1
    pos = _ws(b, end, n)
    if pos >= n or b[pos] != 0x3A:
        raise ValueError("expected ':'")
    m.value0 = _ws(b, pos + 1, n)
    m.value1 = _value_end(b, m.value0, n)
    return _next(b, m.value1, n, 0x7D)


cdef inline bint _plain(const unsigned char* b, Py_ssize_t start, Py_ssize_t stop) noexcept:
    """Is [start, stop) of a string free of escapes and control characters
    (its bytes are its UTF-8 text)?"""
    while start < stop:
        if b[start] == 0x5C or b[start] < 0x20:
            return False
        start += 1
    return True


cdef bytes _key(bytes body, const Member* m):
    """A member's key, its escapes decoded (orjson applies JSON's rules)."""
    if _plain(<const unsigned char*>PyBytes_AS_STRING(body), m.key0, m.key1):
        return body[m.key0:m.key1]
    return (<str>_loads(body[m.key0 - 1:m.key1 + 1])).encode()


cdef bint _named(const unsigned char* k, Py_ssize_t size, const char* name, Py_ssize_t length) noexcept:
    """Is the key k[:size] `name`, ignoring ASCII case (Go's field match)?"""
    cdef Py_ssize_t i
    cdef unsigned char c
    if size != length:
        return False
    for i in range(size):
        c = k[i]
        if 0x41 <= c <= 0x5A:
            c += 0x20
        if c != <unsigned char>name[i]:
            return False
    return True


cdef enum:
    # The members routing reads; each has its span's two slots in spans[].
    MODEL = 0
    NAME = 2
    OPTIONS = 4
    MESSAGES = 6
    OTHER = 8


cdef int _routing_member(bytes body, const Member* m) except -1:
    """Which of the members routing reads this one is (OTHER: none)."""
    cdef bytes key
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(body) + m.key0
    cdef Py_ssize_t size = m.key1 - m.key0
    if not _plain(k, 0, size):
        key = _key(body, m)
        k = <const unsigned char*>PyBytes_AS_STRING(key)
        size = PyBytes_GET_SIZE(key)
    if _named(k, size, b"model", 5):
        return MODEL
    if _named(k, size, b"name", 4):
        return NAME
    if _named(k, size, b"options", 7):
        return OPTIONS
    if _named(k, size, b"messages", 8):
        return MESSAGES
    return OTHER


# The last plain string _decoded made, and its bytes: most requests name
# the model the one before named, and comparing bytes costs less than
# decoding them into a new str (and freeing it).
cdef bytes _last_raw = b""
cdef str _last_str = ""


cdef object _decoded(bytes body, Py_ssize_t start, Py_ssize_t stop):
    """The value at [start, stop): a plain string decoded from UTF-8 in
    place, anything else by orjson."""
    global _last_raw, _last_str
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t size = stop - start - 2
    if b[start] == 0x22 and _plain(b, start + 1, stop - 1):
        if PyBytes_GET_SIZE(_last_raw) == size and memcmp(PyBytes_AS_STRING(_last_raw), b + start + 1, size) == 0:
            return _last_str
        value = PyUnicode_DecodeUTF8(<const char*>b + start + 1, size, NULL)
        _last_raw = body[start + 1:stop - 1]
        _last_str = value
        return value
    return _loads(body[start:stop])


cdef bint _blank(object value) except -1:
    """Is value a str that strip() leaves empty (Ollama: "model is required")?"""
    cdef Py_UCS4 c
    if type(value) is not str:
        return False
    for c in <str>value:
        if not c.isspace():
            return False
    return True


cdef bint _names_any(bytes body, Py_ssize_t start, Py_ssize_t stop, tuple names) except -1:
    """Is the value at [start, stop) an object with a member named exactly
    as one of `names` (bytes)?"""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t pos, size
    cdef Member m
    cdef bytes key
    if b[start] != 0x7B:
        return False
    pos = _open(b, start, stop, 0x7B)
    while pos != -1:
        pos = _member(b, pos, stop, &m)
        size = m.key1 - m.key0
        if _plain(b, m.key0, m.key1):
            for name in names:
                if PyBytes_GET_SIZE(name) == size and memcmp(PyBytes_AS_STRING(name), b + m.key0, size) == 0:
                    return True
        elif _key(body, &m) in names:
            return True
    return False


cpdef tuple routing_members(bytes body, tuple runner_options):
    """(model, options, messages) of a JSON object body.

    model     the `model` member's value decoded, or `name`'s where model
              is missing or false (Python's `doc.get("model") or
              doc.get("name")`); None with neither, or when it is a string
              of whitespace
    options   the `options` member's bytes when it is an object with a
              member named as one of runner_options (bytes), else None
    messages  the (start, stop) span of the `messages` member when it is
              an array, else None

    Raises ValueError for a body the scan cannot step through."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), first, pos, last, i
    cdef Py_ssize_t spans[8]
    cdef Member m
    cdef int which
    for i in range(8):
        spans[i] = -1
    first = _ws(b, 0, n)
    pos = _open(b, first, n, 0x7B)
    last = first + 1
    while pos != -1:
        pos = _member(b, pos, n, &m)
        last = m.value1
        which = _routing_member(body, &m)
        if which != OTHER:  # the last of repeated keys wins, as in Go and orjson
            spans[which] = m.value0
            spans[which + 1] = m.value1
    if _ws(b, _ws(b, last, n) + 1, n) != n:  # past the closing brace _next found
        raise ValueError("bytes after the JSON object")
    model = None
    if spans[MODEL] != -1:
        model = _decoded(body, spans[MODEL], spans[MODEL + 1])
    if not model and spans[NAME] != -1:
        model = _decoded(body, spans[NAME], spans[NAME + 1])
    if _blank(model):
        model = None
    options = None
    if spans[OPTIONS] != -1 and _names_any(body, spans[OPTIONS], spans[OPTIONS + 1], runner_options):
        options = body[spans[OPTIONS]:spans[OPTIONS + 1]]
    messages = None
    if spans[MESSAGES] != -1 and b[spans[MESSAGES]] == 0x5B:
        messages = (spans[MESSAGES], spans[MESSAGES + 1])
    return (model, options, messages)


cdef inline void _within(bytes body, Py_ssize_t start, Py_ssize_t stop) except *:
    if start < 0 or stop > PyBytes_GET_SIZE(body) or start >= stop:
        raise ValueError("a span outside the body")


cpdef list members(bytes body, Py_ssize_t start, Py_ssize_t stop):
    """(key, value start, value stop) of each member of the object at
    [start, stop) of body, keys as bytes with their escapes decoded."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t pos
    cdef Member m
    cdef list out = []
    _within(body, start, stop)
    pos = _open(b, start, stop, 0x7B)
    while pos != -1:
        pos = _member(b, pos, stop, &m)
        out.append((_key(body, &m), m.value0, m.value1))
    return out


cpdef list elements(bytes body, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t limit=-1):
    """(start, stop) of each element of the array at [start, stop) of body;
    None when it has more than `limit` elements (when limit >= 0)."""
    cdef const unsigned char* b = <const unsigned char*>PyBytes_AS_STRING(body)
    cdef Py_ssize_t pos, end
    cdef list out = []
    _within(body, start, stop)
    pos = _open(b, start, stop, 0x5B)
    while pos != -1:
        if PyList_GET_SIZE(out) == limit:
            return None
        end = _value_end(b, pos, stop)
        out.append((pos, end))
        pos = _next(b, end, stop, 0x5D)
    return out
