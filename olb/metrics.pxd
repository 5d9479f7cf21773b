# cython: language_level=3
#
# The typed layout of metrics.py's request-path side when it is compiled
# (Cython's pure-Python mode, as proxy.pxd; see docs/performance.md): with
# OLB_METRICS or OLB_ACCESS_LOG on, every request ends in observe().

cimport cython


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

    cpdef request_done(self, endpoint, model, backend, int status, queue_wait, ttft, double duration, tokens,
                       bint stream)


cpdef endpoint_label(path)
cpdef observe(ctx, client, ex, int status, req=*, sent=*)
