# cython: language_level=3
#
# The typed layout of fairqueue.py when it is compiled (Cython's pure-Python
# mode, as proxy.pxd; see docs/performance.md): every request's end asks
# whether the queue holds anyone.

cimport cython


@cython.final
cdef class FairQueue:
    cdef public Py_ssize_t size, per_client, _count, _turn
    cdef public object _lines, _per_client
