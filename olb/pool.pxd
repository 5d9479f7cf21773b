# cython: language_level=3
#
# The typed layout of pool.py when it is compiled (Cython's pure-Python
# mode, as proxy.pxd; see docs/performance.md): a connection is taken and
# parked once a request.

cimport cython


@cython.final
cdef class BackendPool:
    cdef public object loop, host, port, hostport, connect_timeout, _factory
    cdef public Py_ssize_t index, max_idle, opened
    cdef public list _idle

    cpdef take(self)
    cpdef put(self, conn)
