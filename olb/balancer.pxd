# cython: language_level=3
#
# The typed layout of balancer.py's per-backend record when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): an
# exchange reads its backend's URL and pool once a request; every request's
# end releases its slot through Balancer.release, a C call.

cimport cython

from olb._core cimport BackendTable
from olb.fairqueue cimport FairQueue
from olb.pool cimport BackendPool


@cython.final
cdef class Backend:
    cdef public object index, spec, url, client, up, down_since, last_error, probe_delay, probing, strikes
    cdef public BackendPool pool


cdef class Balancer:
    # What a request's end reads, typed; the rest of its attributes live in
    # its __dict__ (set across olb and by tests, as on a Python class).
    cdef dict __dict__
    cdef object __weakref__
    cdef public BackendTable table
    cdef public list backends
    cdef public FairQueue queue
    cdef public dict handoff

    cpdef release(self, Py_ssize_t index)
