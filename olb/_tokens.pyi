"""Type stubs for olb._tokens (the compiled token reader).

The docstrings in _tokens.pyx are the reference.
"""

TAIL_BYTES: int

def read_tokens(tail: bytes) -> tuple[int, int, float | None] | None:
    """Token counts from the last bytes of a response body."""

def response_tokens(tail2: bytes | None, tail1: bytes | None, last: bytes) -> tuple[int, int, float | None] | None:
    """read_tokens over the last TAIL_BYTES of a body."""
