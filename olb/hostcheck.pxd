# cython: language_level=3
#
# The typed layout of hostcheck.py when it is compiled (Cython's
# pure-Python mode, as proxy.pxd; see docs/performance.md): a loopback
# listener checks every request's Host.

cimport cython


@cython.final
cdef class HostCheck:
    cdef public object hostname
    cdef public dict _seen
    cdef public object _last
    cdef public bint _last_ok

    cpdef allows(self, host)
