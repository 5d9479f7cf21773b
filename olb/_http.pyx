# cython: language_level=3, embedsignature=True
"""olb's compiled HTTP framing: request heads read, backend heads built and read, body ends found.

Theory of operation
===================

What may live here: byte scanning and byte building on the data path, run
once per request or per chunk, that would otherwise cost a Python call per
byte, per header or per list item.  No IO, no policy; the decisions are in
_core.pyx and the protocol logic (what a request or response means, when a
connection closes) in http.py, which re-exports what is here.  Each
function here is a drop-in for a plain Python one and is held to it by a
differential test; the Python reference is kept in the tests.

parse_request_head
------------------
h11 is olb's HTTP parser of record on the client side, and the only one for
everything unusual: chunked request bodies, Expect: 100-continue, obsolete
line folding, HTTP/1.0 without Host, partial reads at EOF, and every error
answer.  It costs ~50 us of CPU per request head on a 2-core EPYC (regexes
per header line, three events, a state machine), which was half of olb's
CPU per small request.  parse_request_head reads the plain case in C:

    request-line  = method SP origin-or-absolute-target SP "HTTP/1." ("0"/"1") CRLF
    header-line   = token ":" OWS value OWS CRLF      (no obs-fold)
    value bytes   = VCHAR / obs-text / SP / HTAB     (no other CTL)
    exactly one Host; at most one Content-Length, 1-18 digits;
    no Transfer-Encoding, no Expect

and answers "declined" for anything else, so that h11 parses it.  Every
head it accepts is one h11 accepts with the same method, target, version,
(lower-cased name, OWS-stripped value) pairs, body length and keep-alive:
tests/unit/test_http_head.py checks that against h11 on a corpus of real
client heads and on seeded random mutations of them.

upstream_head
-------------
The request head olb sends to a backend: the client's head with the Host
rewritten to the backend's address, hop-by-hop fields dropped (RFC 9110
section 7.6.1, the fields a Connection header names included) and
X-Forwarded-For / X-Forwarded-Host / Content-Length added.  Built in one
bytes object: a pass over the fields measures it, a second fills it, so a
request costs one allocation instead of a list of parts and a join.
Inputs that are not plain bytes in a list of 2-tuples (never the case for
what RequestReader hands out, but a ProxyRequest is a public class) go
through the same logic written with a list and a join.  The Python
original is tests/http_reference.py; tests/unit/test_http_response_head.py
compares the two byte for byte.

parse_response_head and ResponseHead
------------------------------------
The backend's response head: status, (lower-cased name, value) pairs, the
body's framing (RFC 9112 section 6.3) and whether the connection stays
open.  Ollama's Go net/http is a trusted peer, so this is a strict, small
parser, not h11 (see http.py, "Response side").  It finds the head's end
(memchr for each LF), then reads the lines in place, allocating only what
the result holds: the reason, one bytes object per name and per value,
their tuples and the list.  It accepts and refuses exactly what the Python
original did (same results, same BackendProtocolError messages, the checks
in the same order), which tests/unit/test_http_response_head.py checks on
real Ollama heads and on seeded random mutations of them.  Its one
liberty: any bytes-like buffer is read, and the fields are bytes (the
Python one gave a bytearray's slices for a bytearray; olb passes bytes).
ResponseHead's fields are plain objects, so that the class reads and
writes from Python as the Python one did.

BodyScanner
-----------
A resumable state machine that reports where an HTTP/1.1 response body ends
(Content-Length, chunked, or read-until-close) without copying or decoding
it: the proxy forwards the backend's bytes unchanged and only needs the
offset of the end, for keep-alive and pipelining.  See _ChunkState.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.list cimport PyList_CheckExact, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_SIZE
from libc.stdint cimport int64_t
from libc.string cimport memchr, memcmp, memcpy


cdef extern from "string.h" nogil:
    # GNU and BSD libc (Python.h defines _GNU_SOURCE).
    const void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)

# The errors module, not the class: a class imported here would be a public
# name of this module (tests/unit/test_stubs.py), and it is raised only on
# the error path.
from . import errors


cdef unsigned char CR = 13
cdef unsigned char LF = 10
cdef unsigned char SP = 32
cdef unsigned char HTAB = 9
cdef unsigned char SEMI = 59  # ";"
cdef unsigned char COLON = 58  # ":"


cdef inline bint _is_tchar(unsigned char c) noexcept:
    # RFC 9110 section 5.6.2: tchar, the characters of a token (methods and
    # field names).
    if 97 <= (c | 0x20) <= 122 or 48 <= c <= 57:
        return True
    return c in b"!#$%&'*+-.^_`|~"


# ---------------------------------------------------------------------------
# parse_request_head

cdef enum:
    # A Content-Length of 18 digits is under 10**18 < 2**63: no overflow.
    # h11 allows 20; longer ones are declined and h11 decides.
    MAX_LENGTH_DIGITS = 18

cdef bytes _V10 = b"1.0"
cdef bytes _V11 = b"1.1"

# The field names sent on nearly every request (and the response fields a
# backend sends), lower-case: a name is one of these objects when it matches
# (no new bytes object, and none to free), else a new lower-cased copy
# (_field_name).  Picked by length, then compared: a loop over a tuple of
# them cost ~190 instructions a field.
cdef bytes _HOST = b"host"
cdef bytes _ACCEPT = b"accept"
cdef bytes _USER_AGENT = b"user-agent"
cdef bytes _CONNECTION = b"connection"
cdef bytes _CONTENT_TYPE = b"content-type"
cdef bytes _AUTHORIZATION = b"authorization"
cdef bytes _CONTENT_LENGTH = b"content-length"
cdef bytes _ACCEPT_ENCODING = b"accept-encoding"


cdef inline object _common_name(const unsigned char* p, Py_ssize_t n):
    # The shared object for a common field name, or None: the one name of
    # its length (two of length 10, told apart by the first letter), then
    # compared.
    cdef bytes name
    if n == 4:
        name = _HOST
    elif n == 6:
        name = _ACCEPT
    elif n == 10:
        name = _USER_AGENT if _lower(p[0]) == 117 else _CONNECTION  # "u"
    elif n == 12:
        name = _CONTENT_TYPE
    elif n == 13:
        name = _AUTHORIZATION
    elif n == 14:
        name = _CONTENT_LENGTH
    elif n == 15:
        name = _ACCEPT_ENCODING
    else:
        return None
    return name if _name_is(p, n, PyBytes_AS_STRING(name), n) else None


cdef bytes _field_name(const unsigned char* p, Py_ssize_t n):
    cdef bytes name
    cdef char* out
    cdef Py_ssize_t k
    common = _common_name(p, n)
    if common is not None:
        return <bytes>common
    name = PyBytes_FromStringAndSize(NULL, n)
    out = PyBytes_AS_STRING(name)
    for k in range(n):
        out[k] = <char>_lower(p[k])
    return name


cdef inline unsigned char _lower(unsigned char c) noexcept:
    if 65 <= c <= 90:
        return c | 0x20
    return c


cdef inline bint _name_is(const unsigned char* p, Py_ssize_t n, const char* lower_name,
                          Py_ssize_t m) noexcept:
    # Case-insensitive comparison of a field name against a lower-case literal.
    cdef Py_ssize_t k
    if n != m:
        return False
    for k in range(n):
        if _lower(p[k]) != <unsigned char>lower_name[k]:
            return False
    return True


cdef bint _has_close_token(const unsigned char* p, Py_ssize_t n) noexcept:
    # Connection is a comma-separated token list; h11 (get_comma_header)
    # splits on ",", strips whitespace and lower-cases, then looks for "close".
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t lo
    cdef Py_ssize_t end
    cdef Py_ssize_t i = 0
    while i <= n:
        if i == n or p[i] == 44:  # ","
            lo = start
            end = i
            while lo < end and (p[lo] == SP or p[lo] == HTAB):
                lo += 1
            while end > lo and (p[end - 1] == SP or p[end - 1] == HTAB):
                end -= 1
            if _name_is(p + lo, end - lo, b"close", 5):
                return True
            start = i + 1
        i += 1
    return False


cdef object _parse_head(const unsigned char* p, Py_ssize_t n, Py_ssize_t max_head,
                        Py_ssize_t search_from):
    cdef Py_ssize_t limit = n if n < max_head else max_head
    cdef Py_ssize_t i
    cdef Py_ssize_t head_len = -1
    cdef Py_ssize_t pos
    cdef Py_ssize_t start
    cdef Py_ssize_t name_end
    cdef Py_ssize_t value_end
    cdef Py_ssize_t k
    cdef Py_ssize_t hosts = 0
    cdef int64_t length = -1
    cdef bint close = False
    cdef unsigned char c
    cdef unsigned char minor
    cdef const unsigned char* q

    if n == 0:
        return None
    # h11 answers 400 on a first byte that cannot start a request line
    # (is_next_line_obviously_invalid_request_line), and tolerates nothing
    # before it; either way the plain case starts with a method.
    if not _is_tchar(p[0]):
        return False

    # The end of the head: the first CRLF CRLF, within max_head bytes.
    # search_from lets a caller that got None resume where it stopped
    # instead of rescanning a head that trickles in.  h11 also ends lines
    # and heads at a bare LF; a head with one is declined here, so that
    # h11 reads it as it would (and we never wait for a CRLF CRLF that a
    # bare-LF client will not send).
    i = search_from if search_from > 1 else 1
    while i < limit:
        # From LF to LF (memchr): the bytes between need no look here.
        q = <const unsigned char*>memchr(p + i, LF, limit - i)
        if q == NULL:
            break
        i = q - p
        if p[i - 1] != CR:
            return False
        if i >= 3 and p[i - 3] == CR and p[i - 2] == LF:
            head_len = i + 1
            break
        i += 1
    if head_len < 0:
        # Not complete.  Past the limit h11 decides (431 Request Header
        # Fields Too Large).
        return False if n >= max_head else None

    # Request line.  Every loop below stops at the CR of a line end at the
    # latest, and the head ends in CRLF CRLF, so none can run past head_len.
    pos = 0
    while _is_tchar(p[pos]):
        pos += 1
    if p[pos] != SP:
        return False
    method = PyBytes_FromStringAndSize(<const char*>p, pos)
    pos += 1
    start = pos
    while 0x21 <= p[pos] <= 0x7E:  # request-target: VCHAR+ (h11's grammar)
        pos += 1
    if pos == start or p[pos] != SP:
        return False
    target = PyBytes_FromStringAndSize(<const char*>(p + start), pos - start)
    pos += 1
    if pos + 10 > head_len or memcmp(p + pos, b"HTTP/1.", 7) != 0:
        return False
    minor = p[pos + 7]
    if (minor != 48 and minor != 49) or p[pos + 8] != CR or p[pos + 9] != LF:
        return False
    pos += 10

    headers = []
    while p[pos] != CR:
        # A field line: token ":" OWS value OWS CRLF.  A line that starts
        # with SP/HTAB (obs-fold) has an empty name and is declined.
        start = pos
        while _is_tchar(p[pos]):
            pos += 1
        if pos == start or p[pos] != COLON:
            return False
        name_end = pos
        pos += 1
        while p[pos] == SP or p[pos] == HTAB:
            pos += 1
        i = pos           # value start
        value_end = pos
        while True:
            c = p[pos]
            if c == CR:
                break
            if 0x21 <= c <= 0x7E or c >= 0x80:
                value_end = pos + 1
            elif c != SP and c != HTAB:
                return False  # a control byte (bare LF included): h11 decides
            pos += 1
        if p[pos + 1] != LF:
            return False
        pos += 2

        name = _field_name(p + start, name_end - start)
        value = PyBytes_FromStringAndSize(<const char*>(p + i), value_end - i)
        headers.append((name, value))

        # The fields that change framing or need h11's handling.
        if _name_is(p + start, name_end - start, b"host", 4):
            hosts += 1
        elif _name_is(p + start, name_end - start, b"content-length", 14):
            if length >= 0 or value_end == i or value_end - i > MAX_LENGTH_DIGITS:
                return False
            length = 0
            for k in range(i, value_end):
                c = p[k]
                if not 48 <= c <= 57:
                    return False
                length = length * 10 + (c - 48)
        elif _name_is(p + start, name_end - start, b"connection", 10):
            if _has_close_token(p + i, value_end - i):
                close = True
        elif (_name_is(p + start, name_end - start, b"transfer-encoding", 17)
              or _name_is(p + start, name_end - start, b"expect", 6)):
            return False
    if p[pos + 1] != LF or pos + 2 != head_len:
        return False
    if hosts != 1:
        return False  # h11 requires Host on 1.1 and refuses two
    return (method, target, _V11 if minor == 49 else _V10, headers, head_len, length,
            minor == 49 and not close)


cpdef parse_request_head(data, Py_ssize_t max_head, Py_ssize_t search_from=0):
    """Parse the request head at the start of `data`, if it is the plain case.

    Args:
        data: bytes-like, what the client sent from the start of a request.
        max_head: the longest head to look for (h11's max_incomplete_event_size).
        search_from: how far an earlier call that returned None had scanned
            (len(data) then); the search for the end of the head resumes there.

    Returns:
        None: the head is not complete yet (and data is under max_head bytes).
        False: declined: not the plain case, or malformed; let h11 parse it.
        A tuple (method, target, http_version, headers, head_len,
        content_length, keep_alive): headers is a list of (lower-case name,
        value) as h11 gives them; the head is data[:head_len]; content_length
        is -1 when there is no Content-Length field.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _parse_head(<const unsigned char*>PyBytes_AS_STRING(data),
                           PyBytes_GET_SIZE(data), max_head, search_from)
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return _parse_head(<const unsigned char*>view.buf, view.len, max_head, search_from)
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------------------
# BodyScanner

cdef enum _Mode:
    MODE_IDLE = 0      # no body expected yet: feed() is a usage error
    MODE_LENGTH        # Content-Length: _remaining bytes to go
    MODE_CHUNKED       # Transfer-Encoding: chunked, see _ChunkState
    MODE_CLOSE         # body runs to EOF; feed() never finds an end
    MODE_DONE          # body complete; feed() returns 0
    MODE_ERROR         # framing was bad; feed() raises again

# RFC 9112 section 7.1:
#
#   chunked-body = *chunk last-chunk trailer-section CRLF
#   chunk        = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
#   last-chunk   = 1*("0") [ chunk-ext ] CRLF
#   chunk-ext    = *( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )
#
#            hex digit               SP/HTAB         ";"
#   SIZE ───────────────> SIZE ──────────> SIZE_WS ─────> EXT ──(any but CR/LF)──> EXT
#     │ CR                       │ ";" ───────────────────^  │ CR
#     v                          v CR                        v
#   SIZE_LF <─────────────────────────────────────────────────
#     │ LF: size > 0 ──> DATA ──(size bytes)──> DATA_CR ─CR─> DATA_LF ─LF─> SIZE
#     │ LF: size == 0
#     v
#   TRAILER ─tchar─> TRAILER_NAME ─":"─> TRAILER_LINE ─CR─> TRAILER_LF ─LF─> TRAILER
#     │ CR
#     v
#   FINAL_LF ─LF─> done
#
# Trailer fields are checked only as far as `token ":"`: a size-0 line
# followed by something that is not a field is the usual sign of a
# mis-sized chunk, and h11 and Go both refuse it.
# Line ends must be CRLF.  RFC 9112 section 2.2 lets a recipient accept a bare
# LF, but we are not the last recipient: the client parses the same bytes, and
# if we ended the body somewhere its parser did not, the next response on that
# connection would be misread.  Refusing (and closing) is the safe answer;
# Ollama's Go net/http always writes CRLF.
cdef enum _ChunkState:
    CS_SIZE = 0       # at a chunk-size line (between chunks when no digits yet)
    CS_SIZE_WS        # whitespace after the size digits
    CS_EXT            # inside chunk extensions, skipped to CR
    CS_SIZE_LF        # CR seen on the size line
    CS_DATA           # inside chunk data, _remaining bytes to go
    CS_DATA_CR        # chunk data done, CR must follow
    CS_DATA_LF        # then LF
    CS_TRAILER        # at the start of a trailer line or of the final CRLF
    CS_TRAILER_NAME   # inside a trailer field name
    CS_TRAILER_LINE   # inside a trailer field value, skipped to CR
    CS_TRAILER_LF     # CR seen on a trailer line
    CS_FINAL_LF       # CR seen on the empty line that ends the body

cdef enum:
    # Longest chunk-size line (size, extensions, whitespace) and longest
    # trailer line, without the CRLF, in bytes.  We buffer nothing, so this is
    # not about memory: it makes a peer that is not speaking chunked fail fast
    # instead of streaming unbounded "extension" bytes.  Precedent: Go's
    # net/http (the server behind Ollama) rejects chunk lines over 4096 bytes
    # (maxLineLength, net/http/internal/chunked.go).
    MAX_CHUNK_LINE = 4096  # bytes

# Largest chunk size we accept (4 EiB, far beyond any real body).  Keeps the
# size arithmetic and bytes_seen clear of int64 overflow.
cdef int64_t MAX_CHUNK_SIZE = (<int64_t>1) << 62  # bytes



cdef inline int _hex_value(unsigned char c) noexcept:
    if 48 <= c <= 57:           # 0-9
        return c - 48
    c |= 0x20                   # fold to lower case
    if 97 <= c <= 102:          # a-f
        return c - 87
    return -1


@cython.final
cdef class BodyScanner:
    """Finds where one HTTP/1.1 response body ends, without copying it.

    Call one expect_*() after each response head, then feed() every piece of
    the body as it arrives until it returns an offset.  Reuse the scanner for
    the next response by calling expect_*() again.
    """

    def __init__(self):
        self._mode = MODE_IDLE

    cdef void _reset(self, int mode) noexcept:
        self._mode = mode
        self._state = CS_SIZE
        self._remaining = 0
        self._chunk_size = 0
        self._line_len = 0
        self._digits = 0
        self.bytes_seen = 0
        self._error = NULL
        self._error_byte = -1
        self._error_at = 0
        self._fed_at_boundary = False

    cpdef expect_chunked(self):
        """Start a body sent with Transfer-Encoding: chunked."""
        self._reset(MODE_CHUNKED)

    cpdef expect_length(self, int64_t n):
        """Start a body of exactly `n` bytes (Content-Length).

        Args:
            n: the length; 0 means the body is already complete.

        Raises:
            ValueError: n is negative.
        """
        if n < 0:
            raise ValueError(f"Content-Length must be >= 0, got {n}")
        self._reset(MODE_LENGTH if n > 0 else MODE_DONE)
        self._remaining = n

    cpdef expect_close(self):
        """Start a body that ends when the backend closes the connection."""
        self._reset(MODE_CLOSE)

    @property
    def done(self):
        """Whether the current body has ended."""
        return self._mode == MODE_DONE

    @property
    def at_chunk_boundary(self):
        """Whether a chunked body is between chunks.

        True before the first chunk-size line and right after each chunk's
        closing CRLF: a complete chunk (e.g. a final error chunk) may be
        injected there without corrupting the framing.  After a feed() that
        raised, whether the bytes before that piece ended between chunks:
        the piece itself is not forwarded, so an error chunk may follow them.
        """
        if self._mode == MODE_ERROR:
            return self._fed_at_boundary
        return (self._mode == MODE_CHUNKED and self._state == CS_SIZE
                and self._line_len == 0)

    cpdef Py_ssize_t feed(self, data) except -3:
        """Scan the next piece of the body.

        Args:
            data: any bytes-like object; read in place, never copied.

        Returns:
            -1 if the body has not ended within data; otherwise the offset
            just past the body's last byte, so data[:offset] is the body's
            tail and data[offset:] belongs to whatever follows.  Once the
            body is done, further feeds return 0.

        Raises:
            ValueError: the chunked framing is malformed (the message says
                what and where); the scanner stays failed until expect_*().
            RuntimeError: no expect_*() was called.
        """
        # (cpdef on a final class: olb/_relay.pyx calls it once per chunk as
        # a C function, without a Python call.)
        cdef Py_buffer view
        cdef Py_ssize_t result
        if self._mode == MODE_IDLE:
            raise RuntimeError("BodyScanner.feed() before expect_*()")
        if PyBytes_CheckExact(data):
            result = self._scan(<const unsigned char*>PyBytes_AS_STRING(data),
                                PyBytes_GET_SIZE(data))
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                result = self._scan(<const unsigned char*>view.buf, view.len)
            finally:
                PyBuffer_Release(&view)
        if result == -2:
            reason = self._error.decode("ascii")
            if self._error_byte >= 0:
                raise ValueError(
                    f"malformed chunked body: {reason}: got "
                    f"{bytes([self._error_byte])!r} at body byte {self._error_at}")
            raise ValueError(
                f"malformed chunked body: {reason} at body byte {self._error_at}")
        return result

    cdef Py_ssize_t _scan(self, const unsigned char* p, Py_ssize_t n) noexcept:
        # Returns -1 (not ended), the end offset, or -2 (error recorded).
        cdef Py_ssize_t end
        if self._mode == MODE_CHUNKED:
            return self._scan_chunked(p, n)
        if self._mode == MODE_LENGTH:
            if n < self._remaining:
                self._remaining -= n
                self.bytes_seen += n
                return -1
            end = <Py_ssize_t>self._remaining
            self.bytes_seen += self._remaining
            self._remaining = 0
            self._mode = MODE_DONE
            return end
        if self._mode == MODE_CLOSE:
            self.bytes_seen += n
            return -1
        if self._mode == MODE_DONE:
            return 0
        return -2  # MODE_ERROR: the message from the first failure stands

    cdef Py_ssize_t _scan_chunked(self, const unsigned char* p, Py_ssize_t n) noexcept:
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t end
        cdef int64_t take
        cdef int digit
        cdef unsigned char c
        cdef int state = self._state
        cdef const char* error = NULL
        # Where this piece starts, for at_chunk_boundary should it be malformed.
        self._fed_at_boundary = state == CS_SIZE and self._line_len == 0

        while pos < n:
            if state == CS_DATA:
                # The bulk of the body: skip it without looking.
                take = n - pos
                if take > self._remaining:
                    take = self._remaining
                pos += <Py_ssize_t>take
                self._remaining -= take
                if self._remaining == 0:
                    state = CS_DATA_CR
                continue

            c = p[pos]
            if state == CS_SIZE:
                digit = _hex_value(c)
                if digit >= 0:
                    # Checked before the shift, so it cannot overflow.
                    if self._chunk_size > (MAX_CHUNK_SIZE >> 4):
                        error = b"chunk size above 2**62"
                        break
                    self._chunk_size = self._chunk_size * 16 + digit
                    if self._chunk_size > MAX_CHUNK_SIZE:
                        error = b"chunk size above 2**62"
                        break
                    self._digits += 1
                elif self._digits == 0:
                    error = b"expected a hex digit at the start of a chunk-size line"
                    break
                elif c == SP or c == HTAB:
                    state = CS_SIZE_WS
                elif c == SEMI:
                    state = CS_EXT
                elif c == CR:
                    state = CS_SIZE_LF
                else:
                    error = b"invalid character in chunk-size line"
                    break
                if state != CS_SIZE_LF:
                    self._line_len += 1
            elif state == CS_SIZE_WS:
                if c == SEMI:
                    state = CS_EXT
                elif c == CR:
                    state = CS_SIZE_LF
                elif c != SP and c != HTAB:
                    error = b"invalid character after chunk size"
                    break
                if state != CS_SIZE_LF:
                    self._line_len += 1
            elif state == CS_EXT:
                if c == CR:
                    state = CS_SIZE_LF
                elif c == LF:
                    error = b"bare LF in chunk extension (CRLF required)"
                    break
                else:
                    self._line_len += 1
            elif state == CS_SIZE_LF:
                if c != LF:
                    error = b"expected LF after CR in chunk-size line"
                    break
                self._line_len = 0
                self._digits = 0
                if self._chunk_size == 0:
                    state = CS_TRAILER
                else:
                    self._remaining = self._chunk_size
                    self._chunk_size = 0
                    state = CS_DATA
            elif state == CS_DATA_CR:
                if c != CR:
                    error = b"expected CRLF after chunk data (chunk longer than its size?)"
                    break
                state = CS_DATA_LF
            elif state == CS_DATA_LF:
                if c != LF:
                    error = b"expected LF after CR following chunk data"
                    break
                state = CS_SIZE
            elif state == CS_TRAILER:
                if c == CR:
                    state = CS_FINAL_LF
                elif c == LF:
                    error = b"bare LF in trailer section (CRLF required)"
                    break
                elif _is_tchar(c):
                    state = CS_TRAILER_NAME
                    self._line_len = 1
                else:
                    error = b"invalid trailer field name"
                    break
            elif state == CS_TRAILER_NAME:
                if c == 58:  # ":"
                    state = CS_TRAILER_LINE
                elif not _is_tchar(c):
                    error = b"invalid trailer field name"
                    break
                self._line_len += 1
            elif state == CS_TRAILER_LINE:
                if c == CR:
                    state = CS_TRAILER_LF
                elif c == LF:
                    error = b"bare LF in trailer field (CRLF required)"
                    break
                else:
                    self._line_len += 1
            elif state == CS_TRAILER_LF:
                if c != LF:
                    error = b"expected LF after CR in trailer field"
                    break
                self._line_len = 0
                state = CS_TRAILER
            else:  # CS_FINAL_LF
                if c != LF:
                    error = b"expected LF after CR ending the trailer section"
                    break
                end = pos + 1
                self.bytes_seen += end
                self._state = state
                self._mode = MODE_DONE
                return end
            if self._line_len > MAX_CHUNK_LINE:
                self._state = state
                self._mode = MODE_ERROR
                self._error = b"chunk-size or trailer line longer than 4096 bytes"
                self._error_byte = -1
                self._error_at = self.bytes_seen + pos
                return -2
            pos += 1

        if error != NULL:
            self._state = state
            self._mode = MODE_ERROR
            self._error = error
            self._error_byte = c
            self._error_at = self.bytes_seen + pos
            return -2
        self._state = state
        self.bytes_seen += n
        return -1


# ---------------------------------------------------------------------------
# upstream_head

cdef enum _Upstream:
    UP_FORWARD = 0      # copied to the backend as it came
    UP_DROP             # hop-by-hop, or rewritten (Host, Content-Length)
    UP_CONNECTION       # dropped, and the fields it names are dropped too
    UP_HOST             # dropped; its value becomes X-Forwarded-Host
    UP_FORWARDED_FOR    # dropped; re-added with the client's address after it

cdef enum:
    # Connection tokens kept as spans into the field values.  Clients send
    # one ("keep-alive" or "close"); more than this and the tokens go into a
    # Python set, as http.py had them, so that a head full of tokens costs
    # a hash per field rather than a comparison per token per field.
    MAX_SPAN_TOKENS = 8

cdef struct _Span:
    const unsigned char* p
    Py_ssize_t n


cdef inline bint _is(const char* p, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept:
    return n == m and memcmp(p, lit, m) == 0


cdef int _upstream_kind(const char* p, Py_ssize_t n) noexcept:
    # What upstream_head does with a field, by its name.  The names are
    # compared exactly, as the frozenset of http.py did: RequestReader's
    # names are lower-case already (h11's and parse_request_head's).
    if n == 2:
        return UP_DROP if _is(p, n, b"te", 2) else UP_FORWARD
    if n == 4:
        return UP_HOST if _is(p, n, b"host", 4) else UP_FORWARD
    if n == 6:
        return UP_DROP if _is(p, n, b"expect", 6) else UP_FORWARD
    if n == 7:
        return UP_DROP if _is(p, n, b"trailer", 7) or _is(p, n, b"upgrade", 7) else UP_FORWARD
    if n == 10:
        if _is(p, n, b"connection", 10):
            return UP_CONNECTION
        return UP_DROP if _is(p, n, b"keep-alive", 10) else UP_FORWARD
    if n == 14:
        return UP_DROP if _is(p, n, b"content-length", 14) else UP_FORWARD
    if n == 15:
        return UP_FORWARDED_FOR if _is(p, n, b"x-forwarded-for", 15) else UP_FORWARD
    if n == 16:
        return UP_DROP if _is(p, n, b"proxy-connection", 16) else UP_FORWARD
    if n == 17:
        return UP_DROP if _is(p, n, b"transfer-encoding", 17) else UP_FORWARD
    if n == 19:
        return UP_DROP if _is(p, n, b"proxy-authorization", 19) else UP_FORWARD
    return UP_FORWARD


cdef inline bint _is_space(unsigned char c) noexcept:
    # bytes.strip()'s whitespace (Py_ISSPACE): SP, HTAB, LF, VT, FF, CR.
    return c == SP or 9 <= c <= 13


cdef int _split_tokens(const unsigned char* p, Py_ssize_t n, _Span* out, int count) noexcept:
    # Appends the items of the comma-separated list p[:n] to out[count:],
    # each stripped as bytes.strip() strips (the lower-casing is left to
    # _named); returns the new count, or -1 past MAX_SPAN_TOKENS.
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t lo
    cdef Py_ssize_t hi
    cdef Py_ssize_t i
    for i in range(n + 1):
        if i == n or p[i] == 44:  # ","
            if count == MAX_SPAN_TOKENS:
                return -1
            lo = start
            hi = i
            while lo < hi and _is_space(p[lo]):
                lo += 1
            while hi > lo and _is_space(p[hi - 1]):
                hi -= 1
            out[count].p = p + lo
            out[count].n = hi - lo
            count += 1
            start = i + 1
    return count


cdef bint _named(bytes name, const _Span* tokens, int count, object token_set) except -1:
    # Whether a Connection field names this field: http.py compared the
    # name with each token lower-cased, exactly (so an upper-case byte in
    # the name never matches).
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t k
    cdef int t
    if token_set is not None:
        return name in token_set
    for t in range(count):
        if tokens[t].n != n:
            continue
        k = 0
        while k < n and _lower(tokens[t].p[k]) == p[k]:
            k += 1
        if k == n:
            return True
    return False


cdef inline char* _put(char* w, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(w, PyBytes_AS_STRING(b), n)
    return w + n


cdef inline char* _put_lit(char* w, const char* lit, Py_ssize_t n) noexcept:
    memcpy(w, lit, n)
    return w + n


cpdef set connection_tokens(headers):
    """The lower-cased tokens of every Connection field in `headers`
    ([(lower-case name, value)]): what RequestReader reads keep-alive from,
    and the field names upstream_head drops as hop-by-hop."""
    cdef set tokens = set()
    for name, value in headers:
        if name == b"connection":
            for t in value.split(b","):
                tokens.add(t.strip().lower())
    return tokens


cdef object _upstream_head_bytes(bytes method, bytes target, bint http10, list headers,
                                 bytes hostport, bytes client_ip, bint with_length,
                                 Py_ssize_t body_len, bytes body):
    # The fast path of upstream_head: every input plain bytes.  Returns None
    # when a field is not a 2-tuple of bytes (upstream_head then takes the
    # general path).  Between the passes no Python code runs, so the list
    # the second pass reads is the one the first measured.  `body`, when
    # not None, is copied in after the head: one buffer for one write.
    cdef Py_ssize_t n = PyList_GET_SIZE(headers)
    cdef Py_ssize_t i
    cdef Py_ssize_t size
    cdef Py_ssize_t digits = 0
    cdef Py_ssize_t v
    cdef int kind
    cdef int count = 0
    cdef bint connection = False
    cdef _Span tokens[MAX_SPAN_TOKENS]
    cdef char number[24]
    cdef char* w
    cdef bytes name
    cdef bytes value
    cdef object token_set = None
    cdef object forwarded_for = None
    cdef object orig_host = None

    # Pass 1: check and classify the fields, gather the Connection tokens,
    # measure what is forwarded.
    size = PyBytes_GET_SIZE(method) + 1 + PyBytes_GET_SIZE(target) + 17 + PyBytes_GET_SIZE(hostport) + 2
    for i in range(n):
        item = headers[i]
        if not PyTuple_CheckExact(item) or PyTuple_GET_SIZE(item) != 2:
            return None
        if not PyBytes_CheckExact((<tuple>item)[0]) or not PyBytes_CheckExact((<tuple>item)[1]):
            return None
        name = (<tuple>item)[0]
        value = (<tuple>item)[1]
        kind = _upstream_kind(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))
        if kind == UP_FORWARD:
            size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
        elif kind == UP_CONNECTION:
            connection = True
            if token_set is None:
                count = _split_tokens(<const unsigned char*>PyBytes_AS_STRING(value),
                                      PyBytes_GET_SIZE(value), tokens, count)
                if count < 0:
                    token_set = connection_tokens(headers)
        elif kind == UP_HOST:
            orig_host = value  # the last one, as http.py took it
        elif kind == UP_FORWARDED_FOR:
            forwarded_for = value
    if connection:
        # Fields named in Connection are hop-by-hop too (RFC 9110 section 7.6.1).
        for i in range(n):
            name = (<tuple>headers[i])[0]
            if (_upstream_kind(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) == UP_FORWARD
                    and _named(name, tokens, count, token_set)):
                size -= PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE((<tuple>headers[i])[1]) + 4
    size += 17 + PyBytes_GET_SIZE(client_ip) + 2  # x-forwarded-for
    if forwarded_for:
        size += PyBytes_GET_SIZE(forwarded_for) + 2
    if orig_host is not None:
        size += 18 + PyBytes_GET_SIZE(orig_host) + 2
    if with_length:
        v = body_len
        while True:
            number[23 - digits] = <char>(48 + v % 10)
            digits += 1
            v //= 10
            if v == 0:
                break
        size += 16 + digits + 2
    size += 2
    if body is not None:
        size += PyBytes_GET_SIZE(body)

    # Pass 2: fill.
    out = PyBytes_FromStringAndSize(NULL, size)
    w = PyBytes_AS_STRING(out)
    w = _put(w, method)
    w[0] = b" "
    w = _put(w + 1, target)
    w = _put_lit(w, b" HTTP/1.0\r\nhost: " if http10 else b" HTTP/1.1\r\nhost: ", 17)
    w = _put(w, hostport)
    w = _put_lit(w, b"\r\n", 2)
    for i in range(n):
        name = (<tuple>headers[i])[0]
        if _upstream_kind(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name)) != UP_FORWARD:
            continue
        if connection and _named(name, tokens, count, token_set):
            continue
        w = _put(w, name)
        w = _put_lit(w, b": ", 2)
        w = _put(w, (<tuple>headers[i])[1])
        w = _put_lit(w, b"\r\n", 2)
    w = _put_lit(w, b"x-forwarded-for: ", 17)
    if forwarded_for:
        w = _put(w, forwarded_for)
        w = _put_lit(w, b", ", 2)
    w = _put(w, client_ip)
    w = _put_lit(w, b"\r\n", 2)
    if orig_host is not None:
        w = _put_lit(w, b"x-forwarded-host: ", 18)
        w = _put(w, orig_host)
        w = _put_lit(w, b"\r\n", 2)
    if with_length:
        w = _put_lit(w, b"content-length: ", 16)
        w = _put_lit(w, number + 24 - digits, digits)
        w = _put_lit(w, b"\r\n", 2)
    w = _put_lit(w, b"\r\n", 2)
    if body is not None:
        w = _put(w, body)
    assert w == PyBytes_AS_STRING(out) + size
    return out


# RFC 9110 section 7.6.1 hop-by-hop fields, plus Proxy-Connection (sent by
# old clients).  Host and Content-Length are rewritten, Expect is answered by
# olb itself (the body is already complete when the request goes upstream).
# _upstream_kind is the same set, for the fast path.
cdef set _DROP_UPSTREAM = {
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length", b"expect",
    b"proxy-authorization",
}


cdef bytes _upstream_head_any(method, target, bint http10, headers, hostport, client_ip,
                              bint with_length, Py_ssize_t body_len):
    # upstream_head for inputs that are not all plain bytes: http.py's code
    # as it was, so that anything it accepted (a bytearray value, a list for
    # a pair) gives the same bytes, and anything it refused the same error.
    cdef set drop = _DROP_UPSTREAM
    tokens = None
    parts = [method, b" ", target, b" HTTP/1.0\r\nhost: " if http10 else b" HTTP/1.1\r\nhost: ",
             hostport, b"\r\n"]
    forwarded_for = None
    orig_host = None
    for name, value in headers:
        if name in drop:
            if name == b"connection":
                tokens = connection_tokens(headers)
            elif name == b"host":
                orig_host = value
            continue
        if name == b"x-forwarded-for":
            forwarded_for = value
            continue
        parts += (name, b": ", value, b"\r\n")
    if tokens:
        kept = parts[:6]
        for i in range(6, len(parts), 4):
            if parts[i] not in tokens:
                kept += parts[i:i + 4]
        parts = kept
    parts += (b"x-forwarded-for: ",
              forwarded_for + b", " + client_ip if forwarded_for else client_ip, b"\r\n")
    if orig_host is not None:
        parts += (b"x-forwarded-host: ", orig_host, b"\r\n")
    if with_length:
        parts += (b"content-length: ", b"%d" % body_len, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def upstream_head(req, hostport, client_ip):
    """The request head olb sends to a backend (the body follows unchanged).

    Args:
        req: an olb.http.ProxyRequest (method, target, http_version, headers,
            body and has_body_framing are read).
        hostport: the backend's address, sent as Host (Ollama bound to
            127.0.0.1 answers 403 to a non-local Host).
        client_ip: appended to X-Forwarded-For.

    Returns:
        The head, bytes, through its empty line.  Hop-by-hop fields (RFC 9110
        section 7.6.1, Proxy-Connection, the fields Connection names),
        Expect, Proxy-Authorization, Host and Content-Length are dropped; the
        client's Host becomes X-Forwarded-Host, and Content-Length is the
        body's length when there is a body or the client framed one.

    HTTP/1.0 clients are forwarded as HTTP/1.0, so the backend answers
    without chunked framing (which such a client cannot read) and closes.
    """
    return upstream_head_parts(req.method, req.target, req.http_version == b"1.0", req.headers, req.body,
                               req.has_body_framing, hostport, client_ip)


cpdef bytes upstream_head_parts(method, target, bint http10, headers, body, bint has_body_framing,
                                hostport, client_ip, bint with_body=False):
    """upstream_head from the request's parts: what proxy.py, compiled, calls
    (it holds the request typed; _http cannot cimport http.ProxyRequest, which
    imports this module).  With with_body, the body follows the head in the
    same bytes (a small body: one buffer, one write)."""
    cdef bint with_length = True if body else has_body_framing
    cdef Py_ssize_t body_len = len(body) if with_length else 0
    if (PyBytes_CheckExact(method) and PyBytes_CheckExact(target) and PyList_CheckExact(headers)
            and PyBytes_CheckExact(hostport) and PyBytes_CheckExact(client_ip)
            and (not with_body or PyBytes_CheckExact(body))):
        out = _upstream_head_bytes(method, target, http10, headers, hostport, client_ip, with_length, body_len,
                                   body if with_body else None)
        if out is not None:
            return out
    head = _upstream_head_any(method, target, http10, headers, hostport, client_ip, with_length, body_len)
    return head + bytes(body) if with_body else head


# ---------------------------------------------------------------------------
# parse_response_head

cdef enum:
    _MAX_HEAD = 16 * 1024

#: Largest request or response head. h11's default is 16 KiB, chosen after
#: node (80 KiB), tomcat (8 KiB) and IIS (16 KiB); we keep it.
MAX_HEAD = _MAX_HEAD

cdef enum _Framing:
    # Body framing of a response, from RFC 9112 section 6.3.
    FRAMING_NO_BODY = 0
    FRAMING_CHUNKED = 1
    FRAMING_LENGTH = 2
    FRAMING_UNTIL_CLOSE = 3

#: ResponseHead.framing: no body (1xx, 204, 304, or the answer to HEAD).
NO_BODY = FRAMING_NO_BODY
#: ResponseHead.framing: Transfer-Encoding: chunked.
CHUNKED = FRAMING_CHUNKED
#: ResponseHead.framing: Content-Length bytes.
LENGTH = FRAMING_LENGTH
#: ResponseHead.framing: the body runs until the backend closes.
UNTIL_CLOSE = FRAMING_UNTIL_CLOSE


@cython.final
@cython.freelist(16)
cdef class ResponseHead:
    """A backend's response head, as parse_response_head reads it.

    status (int), reason (bytes), headers ([(lower-case name, value)], the
    values stripped of SP/HTAB), framing (NO_BODY, CHUNKED, LENGTH or
    UNTIL_CLOSE), length (the Content-Length, -1 if none), keep_alive
    (bool), hop_by_hop (a hop-by-hop field was sent: the head must be
    rebuilt to be forwarded) and content_type (bytes, b"" if none).
    """

    # (Fields in _http.pxd: proxy.py, compiled, reads them as struct members.)

    def __init__(self, status, reason, headers, framing, length, keep_alive, hop_by_hop, content_type):
        # parse_response_head does not come through here (ResponseHead.__new__
        # and the fields set in C); this is for Python callers.
        self.status = status
        self.reason = reason
        self._headers = headers
        self.framing = framing
        self.length = length
        self.keep_alive = keep_alive
        self.hop_by_hop = hop_by_hop
        self.content_type = content_type

    @property
    def headers(self):
        """[(lower-case name, value)], the values stripped of SP/HTAB.

        Made when first asked for, from the head's bytes (parse_response_head
        keeps them): the proxy forwards most heads as they came and never
        asks, and a list of tuples of bytes is a dozen allocations a response.
        """
        if self._headers is None and self._raw is not None:
            self._headers = _header_list(<const unsigned char*>PyBytes_AS_STRING(self._raw), self._end)
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = value


cdef inline Py_ssize_t _crlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept:
    # The CR of the first CRLF in p[pos:end], or end if there is none: where
    # bytes.split(b"\r\n") would cut.  memchr finds the LFs (a line has one).
    cdef const unsigned char* q
    pos += 1
    while pos < end:
        q = <const unsigned char*>memchr(p + pos, LF, end - pos)
        if q == NULL:
            return end
        pos = q - p
        if p[pos - 1] == CR:
            return pos - 1
        pos += 1
    return end


cdef bint _has_token(const unsigned char* p, Py_ssize_t n, const char* lit, Py_ssize_t m) noexcept:
    # Whether the comma-separated list p[:n] holds `lit` (lower-case) once
    # each item is stripped and lower-cased as bytes.strip().lower() does.
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t lo
    cdef Py_ssize_t hi
    cdef Py_ssize_t i
    for i in range(n + 1):
        if i == n or p[i] == 44:  # ","
            lo = start
            hi = i
            while lo < hi and _is_space(p[lo]):
                lo += 1
            while hi > lo and _is_space(p[hi - 1]):
                hi -= 1
            if _name_is(p + lo, hi - lo, lit, m):
                return True
            start = i + 1
    return False


cdef inline bytes _cut(const unsigned char* p, Py_ssize_t n, Py_ssize_t most):
    # p[:n][:most], for an error message.
    return PyBytes_FromStringAndSize(<const char*>p, n if n < most else most)


cdef inline void _value_span(const unsigned char* p, Py_ssize_t colon, Py_ssize_t end,
                             Py_ssize_t* vs, Py_ssize_t* ve) noexcept:
    # The value of the field line whose colon is at p[colon] and which ends
    # at p[end]: [vs, ve), stripped of SP/HTAB.
    cdef Py_ssize_t lo = colon + 1
    cdef Py_ssize_t hi = end
    while lo < hi and (p[lo] == SP or p[lo] == HTAB):
        lo += 1
    while hi > lo and (p[hi - 1] == SP or p[hi - 1] == HTAB):
        hi -= 1
    vs[0] = lo
    ve[0] = hi


cdef list _header_list(const unsigned char* p, Py_ssize_t end):
    # The field lines of a head _parse_response accepted (p[:end], the
    # status line first): each name lower-cased, each value stripped of
    # SP/HTAB, as _parse_response read them.
    cdef list headers = []
    cdef Py_ssize_t pos = _crlf(p, 0, end)
    cdef Py_ssize_t start, colon, vs, ve
    cdef const unsigned char* q
    while pos < end:
        start = pos + 2
        pos = _crlf(p, start, end)
        q = <const unsigned char*>memchr(p + start, COLON, pos - start)
        colon = q - p
        _value_span(p, colon, pos, &vs, &ve)
        headers.append((_field_name(p + start, colon - start),
                        PyBytes_FromStringAndSize(<const char*>(p + vs), ve - vs)))
    return headers


cdef object _parse_response(object buf, const unsigned char* p, Py_ssize_t n, bint head_request):
    cdef Py_ssize_t limit = n if n < _MAX_HEAD else _MAX_HEAD
    cdef Py_ssize_t end = -1
    cdef Py_ssize_t i = 3
    cdef Py_ssize_t pos
    cdef Py_ssize_t start
    cdef Py_ssize_t colon
    cdef Py_ssize_t vs
    cdef Py_ssize_t ve
    cdef Py_ssize_t k
    cdef Py_ssize_t name_len
    cdef const unsigned char* q
    cdef int status
    cdef int framing
    cdef int64_t v
    cdef bint http11
    cdef bint chunked = False
    cdef bint close
    cdef bint hop = False
    cdef bint over
    cdef unsigned char c
    cdef ResponseHead head
    cdef object length = None
    cdef const unsigned char* name
    cdef bytes content_type = b""

    # The end of the head: the first CRLF CRLF.  One limit however the bytes
    # arrive: a head read whole is held to it too.  Searching only the first
    # MAX_HEAD bytes decides as a search of all of them would: an end found
    # past the limit, or none in a buffer longer than it, is too large.
    while i < limit:
        q = <const unsigned char*>memchr(p + i, LF, limit - i)
        if q == NULL:
            break
        i = q - p
        if p[i - 1] == CR and p[i - 2] == LF and p[i - 3] == CR:
            end = i - 3
            break
        i += 1
    if end < 0:
        if n > _MAX_HEAD:
            raise errors.BackendProtocolError("backend sent a response head larger than 16 KiB")
        return None

    # Status line: "HTTP/1." any-byte SP 3DIGIT [any-byte reason].  The
    # minor version byte is not checked; only "1" makes the head HTTP/1.1.
    pos = _crlf(p, 0, end)
    if (pos < 12 or memcmp(p, b"HTTP/1.", 7) != 0 or p[8] != SP
            or not (48 <= p[9] <= 57 and 48 <= p[10] <= 57 and 48 <= p[11] <= 57)):
        raise errors.BackendProtocolError(f"backend sent a malformed status line: {_cut(p, pos, 64)!r}")
    status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    http11 = p[7] == 49
    close = not http11
    reason = PyBytes_FromStringAndSize(<const char*>(p + 13), pos - 13) if pos > 13 else b""

    while pos < end:
        # A field line: name ":" value, the name non-empty and not ending in
        # SP/HTAB; the value is stripped of SP/HTAB and otherwise taken as
        # it is (a trusted peer: no obs-fold or CTL checks).
        start = pos + 2
        pos = _crlf(p, start, end)
        q = <const unsigned char*>memchr(p + start, COLON, pos - start) if pos > start else NULL
        colon = q - p if q != NULL else start
        if colon == start or p[colon - 1] == SP or p[colon - 1] == HTAB:
            raise errors.BackendProtocolError(
                f"backend sent a malformed header line: {_cut(p + start, pos - start, 64)!r}")
        # The fields are read in place; the list of them is made only if
        # asked for (ResponseHead.headers, _header_list).
        name = p + start
        name_len = colon - start
        _value_span(p, colon, pos, &vs, &ve)

        if _name_is(name, name_len, b"content-length", 14):
            # 1*DIGIT; a second one must say the same.  Up to 10**18 in C,
            # longer ones through int() as http.py read them all (which
            # raises ValueError past sys.get_int_max_str_digits()).
            if vs == ve:
                raise errors.BackendProtocolError(f"backend sent a bad Content-Length: {_cut(p + vs, ve - vs, 32)!r}")
            v = 0
            over = False
            for k in range(vs, ve):
                c = p[k]
                if not 48 <= c <= 57:
                    raise errors.BackendProtocolError(f"backend sent a bad Content-Length: {_cut(p + vs, ve - vs, 32)!r}")
                if v >= 100000000000000000:
                    over = True
                else:
                    v = v * 10 + (c - 48)
            number = int(PyBytes_FromStringAndSize(<const char*>(p + vs), ve - vs)) if over else v
            if length is not None and number != length:
                raise errors.BackendProtocolError(f"backend sent a bad Content-Length: {_cut(p + vs, ve - vs, 32)!r}")
            length = number
        elif _name_is(name, name_len, b"transfer-encoding", 17):
            # Only chunked as the last coding frames a body we can find the end of.
            k = ve
            while k > vs and p[k - 1] != 44:  # ","
                k -= 1
            while k < ve and _is_space(p[k]):
                k += 1
            i = ve
            while i > k and _is_space(p[i - 1]):
                i -= 1
            chunked = _name_is(p + k, i - k, b"chunked", 7)
            if not chunked:
                raise errors.BackendProtocolError(
                    f"backend sent an unsupported Transfer-Encoding: {_cut(p + vs, ve - vs, 32)!r}")
        elif _name_is(name, name_len, b"content-type", 12):
            content_type = PyBytes_FromStringAndSize(<const char*>(p + vs), ve - vs)
        elif _name_is(name, name_len, b"connection", 10):
            hop = True
            if _has_token(p + vs, ve - vs, b"close", 5):
                close = True
            elif not http11 and _has_token(p + vs, ve - vs, b"keep-alive", 10):
                close = False
        elif (_name_is(name, name_len, b"keep-alive", 10) or _name_is(name, name_len, b"proxy-connection", 16)
              or _name_is(name, name_len, b"trailer", 7) or _name_is(name, name_len, b"upgrade", 7)):
            hop = True

    if status < 200 or status == 204 or status == 304 or head_request:
        framing = FRAMING_NO_BODY
    elif chunked:
        framing = FRAMING_CHUNKED
    elif length is not None:
        framing = FRAMING_LENGTH
    else:
        framing = FRAMING_UNTIL_CLOSE
        close = True
    head = ResponseHead.__new__(ResponseHead)
    head.status = status
    head.reason = reason
    head._headers = None
    # The head's bytes, for ResponseHead.headers: the buffer itself when it
    # is bytes (a reference), else a copy of the head.
    head._raw = buf if PyBytes_CheckExact(buf) else PyBytes_FromStringAndSize(<const char*>p, end + 4)
    head._end = end
    head.framing = framing
    head.length = -1 if length is None else length
    head.keep_alive = not close
    head.hop_by_hop = hop
    head.content_type = content_type
    return head, end + 4


cpdef parse_response_head(buf, bint head_request):
    """Parse a backend's response head from the start of `buf`.

    Args:
        buf: bytes (or any bytes-like object) read so far from the backend
            for this response.
        head_request: the request was HEAD (the response has no body
            whatever it says).

    Returns:
        (ResponseHead, head_length) or None when the head is not complete yet.

    Raises:
        BackendProtocolError: the bytes are not an HTTP/1.x response head,
            or the head is larger than MAX_HEAD.
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(buf):
        return _parse_response(buf, <const unsigned char*>PyBytes_AS_STRING(buf), PyBytes_GET_SIZE(buf),
                               head_request)
    PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE)
    try:
        return _parse_response(buf, <const unsigned char*>view.buf, view.len, head_request)
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------------------
# contains

cpdef bint contains(data, bytes needle) except -1:
    """Whether `needle` occurs in `data` (bytes or any bytes-like object).

    What `needle in data` answers, without its cost: bytes.__contains__
    first tries the needle as an integer, and raises and clears a TypeError
    for a bytes one; bytes.find parses its arguments as a tuple.  Asked of
    every generate and chat body (manage.stop_model).
    """
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return memmem(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                      PyBytes_AS_STRING(needle), PyBytes_GET_SIZE(needle)) != NULL
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        return memmem(view.buf, view.len, PyBytes_AS_STRING(needle), PyBytes_GET_SIZE(needle)) != NULL
    finally:
        PyBuffer_Release(&view)


# ---------------------------------------------------------------------------
# path_of

cpdef path_of(target):
    """A request target without its query: `target.partition(b"?")[0]`,
    the target itself when it has none (no new object: the usual case).
    Read once a request (http.ProxyRequest.path)."""
    cdef const char* p
    cdef const char* q
    if not PyBytes_CheckExact(target):
        return target.partition(b"?")[0]
    p = PyBytes_AS_STRING(target)
    q = <const char*>memchr(p, 63, PyBytes_GET_SIZE(target))  # "?"
    if q == NULL:
        return target
    return PyBytes_FromStringAndSize(p, q - p)
