# cython: language_level=3
#
# The typed layout of http.py's request side when it is compiled (Cython's
# pure-Python mode, as proxy.pxd; see docs/performance.md).

cimport cython

from olb._http cimport parse_request_head, path_of


@cython.final
cdef class ProxyRequest:
    cdef public object method, target, path, http_version, headers, body
    cdef public bint keep_alive, has_body_framing, streamed

    @cython.locals(pair=tuple)
    cpdef header(self, name)


@cython.final
cdef class RequestReader:
    cdef public object _conn, _head, _headers, _chunks, output, _buf, _target
    cdef public Py_ssize_t _max_body, _max_head, _size, _scanned, body_bytes
    cdef public bint _eof, _busy, _close, streaming
    cdef public int waiting

    cpdef receive(self, data)
    cpdef bint buffered(self)
    @cython.locals(method=bytes, target=bytes, head_len=Py_ssize_t, length=Py_ssize_t, end=Py_ssize_t)
    cpdef next_request(self)
    cpdef finish_response(self, int status, bint closing)


cpdef downstream_head(head, raw, bint closing)
