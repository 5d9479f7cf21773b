# cython: language_level=3
#
# The typed layout of dashboard.py's Samples when it is compiled (Cython's
# pure-Python mode, as proxy.pxd; see docs/performance.md): every model
# request adds to its shared counters twice.

cimport cython


@cython.final
cdef class Samples:
    cdef double[:] _all
    cdef public Py_ssize_t _row, _rows
    cdef public object series, events, _last_sums, _last_at, _up, _loaded

    cpdef first_byte(self, double seconds)
    cpdef request_done(self, tokens)
