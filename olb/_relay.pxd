# cython: language_level=3
# Typed layout of the relay (see _relay.pyx), declared here so that
# proxy.py, compiled, may subclass it as an extension type.

from ._http cimport BodyScanner


cdef class Relay:
    cdef public object head
    cdef public BodyScanner scanner
    cdef public object forward
    cdef public double last_io
    cdef public object tail1
    cdef public object tail2
    cdef public object keep  # a list or None (object: the stub may say so)
    cdef public Py_ssize_t keep_left

    cdef int _keep(self, object data) except -1
