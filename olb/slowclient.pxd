# cython: language_level=3
#
# The typed layout of slowclient.py when it is compiled (Cython's
# pure-Python mode, as proxy.pxd; see docs/performance.md): a request's
# clock is read and reset twice a request.

cimport cython


@cython.final
cdef class BodyBudget:
    cdef public Py_ssize_t cap, held


@cython.final
cdef class RequestClock:
    cdef public BodyBudget budget
    cdef public object began, body_began
    cdef public Py_ssize_t body_base, held

    cpdef received(self, Py_ssize_t n, double now)
    cpdef done(self)
