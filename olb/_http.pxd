# cython: language_level=3
#
# Typed layout of olb's compiled HTTP framing (see the theory of operation at
# the top of _http.pyx), declared here so that other Cython modules may
# cimport the scanner and call its cdef methods directly.

cimport cython
from libc.stdint cimport int64_t


@cython.final
cdef class BodyScanner:
    cdef int _mode               # _Mode: what kind of body we are in
    cdef int _state              # _ChunkState, only meaningful when chunked
    cdef int64_t _remaining      # bytes left in the current chunk / length body
    cdef int64_t _chunk_size     # size being parsed from a chunk-size line
    cdef Py_ssize_t _line_len    # bytes of the current size/trailer line so far
    cdef Py_ssize_t _digits      # hex digits of the current size line so far
    # Body bytes consumed so far, as on the wire (chunk framing included).
    cdef readonly int64_t bytes_seen
    cdef const char* _error      # static C string: why the framing is bad
    cdef int _error_byte         # offending byte, or -1 for a length limit
    cdef int64_t _error_at       # body offset of the offending byte
    cdef bint _fed_at_boundary   # the last chunked piece fed began between chunks

    cpdef expect_chunked(self)
    cpdef expect_length(self, int64_t n)
    cpdef expect_close(self)
    cpdef Py_ssize_t feed(self, data) except -3
    cdef void _reset(self, int mode) noexcept
    cdef Py_ssize_t _scan(self, const unsigned char* p, Py_ssize_t n) noexcept
    cdef Py_ssize_t _scan_chunked(self, const unsigned char* p, Py_ssize_t n) noexcept


@cython.final
cdef class ResponseHead:
    cdef public int status
    cdef public object reason
    cdef object _headers         # the `headers` property's list, made when first read
    cdef bytes _raw              # the bytes the head was read from (p[:_end + 4] the head)
    cdef Py_ssize_t _end
    cdef public int framing
    cdef public object length
    cdef public bint keep_alive
    cdef public bint hop_by_hop
    cdef public object content_type


cpdef parse_request_head(data, Py_ssize_t max_head, Py_ssize_t search_from=*)
cpdef parse_response_head(buf, bint head_request)
cpdef bytes upstream_head_parts(method, target, bint http10, headers, body, bint has_body_framing,
                                hostport, client_ip, bint with_body=*)
cpdef bint contains(data, bytes needle) except -1
cpdef path_of(target)
