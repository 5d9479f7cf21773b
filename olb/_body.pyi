"""Type stubs for olb._body (the compiled request-body reader).

The docstrings in _body.pyx are the reference.
"""

def routing_members(
    body: bytes, runner_options: tuple[bytes, ...]
) -> tuple[object, bytes | None, tuple[int, int] | None]:
    """(model, options, messages) of a JSON object body."""

def members(body: bytes, start: int, stop: int) -> list[tuple[bytes, int, int]]:
    """(key, value start, value stop) of each member of the object at [start, stop)."""

def elements(body: bytes, start: int, stop: int, limit: int = -1) -> list[tuple[int, int]] | None:
    """(start, stop) of each element of the array at [start, stop); None past `limit` of them."""
