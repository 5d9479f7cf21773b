# cython: language_level=3
#
# The typed layout of metrics.py's request-path side when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): with
# OLB_METRICS or OLB_ACCESS_LOG on, every request ends in observe().

cimport cython

from olb._http cimport ResponseHead
from olb.http cimport ProxyRequest


@cython.final
cdef class _Series:
    cdef public dict status
    cdef public list duration, ttft, queue, tps
    cdef public double duration_sum, ttft_sum, queue_sum, tps_sum
    cdef public object prompt, generated


@cython.final
cdef class Metrics:
    cdef public object n, base
    cdef public dict series, retries, rejections, ejections, returns, loads, load_wait
    cdef _Series _last_series
    cdef object _last_endpoint, _last_model, _last_backend

    @cython.locals(s=_Series, st=dict)
    cpdef request_done(self, endpoint, model, backend, int status, queue_wait, ttft, double duration, tokens,
                       bint stream)


@cython.locals(i=Py_ssize_t, bound=double)
cpdef Py_ssize_t bucket(tuple bounds, double value) except -1
cpdef endpoint_label(path)
cdef class Observed:
    # proxy.Exchange's base: the fields observe reads, C fields of both.
    cdef public ProxyRequest req
    cdef public ResponseHead head
    cdef public object name, served, tokens
    cdef public Py_ssize_t attempts, sent
    cdef public bint slot
    cdef public double t_admit, t_first


@cython.locals(metrics=Metrics, done=Observed, t_first=double, t0=double)
cpdef observe(ctx, client, ex, int status, ProxyRequest req=*, sent=*)

# Private module globals, typed: a request's lookups are C-API calls.
cdef dict _ENDPOINTS
