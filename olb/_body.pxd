# cython: language_level=3
#
# The request-body reader (see _body.pyx), declared so that models.py,
# compiled, calls it as C functions.

cpdef tuple routing_members(bytes body, tuple runner_options)
cpdef list members(bytes body, Py_ssize_t start, Py_ssize_t stop)
cpdef list elements(bytes body, Py_ssize_t start, Py_ssize_t stop, Py_ssize_t limit=*)
