# cython: language_level=3, embedsignature=True
"""olb's compiled HTTP framing: request heads in, response body ends out.

Theory of operation
===================

What may live here: byte scanning on the data path that must not cost a
Python call per byte.  No IO, no policy; the decisions are in _core.pyx and
the protocol logic (what a request or response means) in http.py.

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
from libc.stdint cimport int64_t
from libc.string cimport memcmp


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
    cdef char* out

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
        if p[i] == LF:
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

        name = PyBytes_FromStringAndSize(NULL, name_end - start)
        out = PyBytes_AS_STRING(name)
        for k in range(name_end - start):
            out[k] = <char>_lower(p[start + k])
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


def parse_request_head(data, Py_ssize_t max_head, Py_ssize_t search_from=0):
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
# size arithmetic and _bytes_seen clear of int64 overflow.
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
        self._bytes_seen = 0
        self._error = NULL
        self._error_byte = -1
        self._error_at = 0
        self._fed_at_boundary = False

    def expect_chunked(self):
        """Start a body sent with Transfer-Encoding: chunked."""
        self._reset(MODE_CHUNKED)

    def expect_length(self, int64_t n):
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

    def expect_close(self):
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

    @property
    def bytes_seen(self):
        """Body bytes consumed so far, as on the wire (chunk framing included)."""
        return self._bytes_seen

    def feed(self, data):
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
        return self.feed_c(data)

    cdef Py_ssize_t feed_c(self, object data) except -3:
        # feed() for Cython callers (olb/_relay.pyx calls it once per chunk
        # without a Python call).
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
                self._bytes_seen += n
                return -1
            end = <Py_ssize_t>self._remaining
            self._bytes_seen += self._remaining
            self._remaining = 0
            self._mode = MODE_DONE
            return end
        if self._mode == MODE_CLOSE:
            self._bytes_seen += n
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
                self._bytes_seen += end
                self._state = state
                self._mode = MODE_DONE
                return end
            if self._line_len > MAX_CHUNK_LINE:
                self._state = state
                self._mode = MODE_ERROR
                self._error = b"chunk-size or trailer line longer than 4096 bytes"
                self._error_byte = -1
                self._error_at = self._bytes_seen + pos
                return -2
            pos += 1

        if error != NULL:
            self._state = state
            self._mode = MODE_ERROR
            self._error = error
            self._error_byte = c
            self._error_at = self._bytes_seen + pos
            return -2
        self._state = state
        self._bytes_seen += n
        return -1
