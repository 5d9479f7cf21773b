# cython: language_level=3
#
# The token counts (see _tokens.pyx), declared so that proxy.py, compiled,
# calls them as C functions at each response's end.

cpdef read_tokens(bytes tail)
cpdef response_tokens(tail2, tail1, bytes last)
