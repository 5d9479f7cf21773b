# cython: language_level=3
#
# admin.py compiled (Cython's pure-Python mode, as proxy.pxd; see
# docs/performance.md) for one function: every request on the data port
# asks is_admin_path, a C call from proxy.py.

cpdef bint is_admin_path(bytes path)
