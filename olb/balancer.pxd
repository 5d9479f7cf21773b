# cython: language_level=3
#
# The typed layout of balancer.py's per-backend record when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): an
# exchange reads its backend's URL and pool once a request. The Balancer
# itself stays a Python class, compiled (its methods run without frames).

cimport cython

from olb.pool cimport BackendPool


@cython.final
cdef class Backend:
    cdef public object index, spec, url, client, up, down_since, last_error, probe_delay, probing, strikes
    cdef public BackendPool pool
