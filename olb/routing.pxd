# cython: language_level=3
#
# The typed layout of routing.py when it is compiled (Cython's pure-Python
# mode, as proxy.pxd; see docs/performance.md).

cimport cython

from olb._core cimport BackendTable
from olb.models cimport ModelDirectory, any_set


@cython.final
cdef class Decision:
    cdef public int kind, reason
    cdef public Py_ssize_t index
    cdef public object mask
    cdef public bint placed


cdef class Router:
    cdef public ModelDirectory models
    cdef public BackendTable table
    cdef public object queued, spread_queue, session_bound
    cdef public Py_ssize_t decisions, cold_decisions, _next_pick

    cpdef acquire(self, allowed=*, affinity=*)
    cpdef pick(self, allowed=*)
    cpdef usable(self, allowed=*)
    cpdef route_any(self, allowed=*, affinity=*)
    cpdef route_no_slot(self, model, allowed=*, excluded=*)
    cpdef route(self, model, runner=*, affinity=*, excluded=*)


cpdef admit(Py_ssize_t index, bint placed=*)
cpdef wait(mask)
cpdef without(mask, excluded)
