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
    # What the subclass defines (see _relay.pyx): C calls through the vtable
    # for proxy.BackendSideProtocol, Python overrides for a Python subclass.
    cpdef _read_head(self, data)
    cpdef _end(self, data, Py_ssize_t end)
    cpdef _protocol_error(self, message)


# The relay's clock, a C call from another compiled module.
cpdef double monotonic() noexcept
