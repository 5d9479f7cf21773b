# cython: language_level=3
#
# The typed layout of accesslog.py's writer when it is compiled (Cython's
# pure-Python mode, as proxy.pxd; see docs/performance.md): one line a
# request.

cimport cython


@cython.final
cdef class AccessLog:
    cdef public object target, loop, _timer, _prefix
    cdef public bint json, _own
    cdef public int _fd
    cdef public list _buf
    cdef public Py_ssize_t _size
    cdef public long long _second

    cpdef write(self, client, method, target, model, backend, int status, queue_wait, ttft, double duration,
                sent, tokens, retries)
    cpdef flush(self)


cpdef _fmt(seconds)
cpdef _num(value)
