"""GGUF headers: enough of the format to read a model's metadata.

Rules for this module: bytes in, values out; no IO.  The simulator never
loads weights, so it reads only what `/api/create` needs from an uploaded
blob: the magic, and the key/value section that Ollama's ggml.Decode reads
before the tensors (fs/ggml/gguf.go).  Arrays are skipped, not kept: a real
GGUF's tokenizer arrays run to megabytes.

Layout (little-endian, GGUF v2/v3): "GGUF", uint32 version, uint64 tensor
count, uint64 key/value count, then per key/value: string key (uint64
length + bytes), uint32 value type, value.  Strings are uint64 length +
bytes; arrays are uint32 element type, uint64 count, elements.
"""

from __future__ import annotations

import struct

MAGIC = b"GGUF"

# ggml.DetectContentType reads the first 4 bytes of a file.
_SCALARS = {
    0: struct.Struct("<B"), 1: struct.Struct("<b"), 2: struct.Struct("<H"), 3: struct.Struct("<h"),
    4: struct.Struct("<I"), 5: struct.Struct("<i"), 6: struct.Struct("<f"), 7: struct.Struct("<?"),
    10: struct.Struct("<Q"), 11: struct.Struct("<q"), 12: struct.Struct("<d"),
}
_STRING = 8
_ARRAY = 9
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")


class Truncated(Exception):
    """The bytes end inside the key/value section."""


def is_gguf(head: bytes) -> bool:
    """ggml.DetectContentType: the GGUF magic at offset 0."""
    return head[:4] == MAGIC


def read_kv(data: bytes) -> dict:
    """The key/value metadata of a GGUF file's first bytes.

    Returns:
        key -> value for every scalar and string key; array-valued keys map
        to their element count.  Keys after the point where `data` ends are
        missing (a head of a large file still yields the general.* and
        architecture keys, which come first in llama.cpp's writers).
    Raises:
        ValueError: not a GGUF v2/v3 header.
    """
    if len(data) < _HEADER.size or not is_gguf(data):
        raise ValueError("not a GGUF file")
    _, version, _, n_kv = _HEADER.unpack_from(data, 0)
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    out = {}
    pos = _HEADER.size
    try:
        for _ in range(n_kv):
            key, pos = _string(data, pos)
            (vtype,), pos = _unpack(_U32, data, pos)
            value, pos = _value(data, pos, vtype)
            out[key] = value
    except Truncated:
        pass
    return out


def _unpack(st: struct.Struct, data: bytes, pos: int):
    end = pos + st.size
    if end > len(data):
        raise Truncated
    return st.unpack_from(data, pos), end


def _string(data: bytes, pos: int):
    (n,), pos = _unpack(_U64, data, pos)
    end = pos + n
    if end > len(data):
        raise Truncated
    return data[pos:end].decode("utf-8", "replace"), end


def _value(data: bytes, pos: int, vtype: int):
    st = _SCALARS.get(vtype)
    if st is not None:
        (v,), pos = _unpack(st, data, pos)
        return v, pos
    if vtype == _STRING:
        return _string(data, pos)
    if vtype == _ARRAY:
        (etype,), pos = _unpack(_U32, data, pos)
        (n,), pos = _unpack(_U64, data, pos)
        est = _SCALARS.get(etype)
        if est is not None:
            pos += est.size * n
            if pos > len(data):
                raise Truncated
        else:
            for _ in range(n):
                _, pos = _value(data, pos, etype)
        return n, pos
    raise ValueError(f"unknown GGUF value type {vtype}")


def write(kv: dict, tensor_count: int = 0) -> bytes:
    """A GGUF v3 header with `kv` (str, int as uint32/uint64, float, bool):
    what tests and the demo upload as a model file."""
    parts = [_HEADER.pack(MAGIC, 3, tensor_count, len(kv))]
    for key, value in kv.items():
        kb = key.encode()
        parts.append(_U64.pack(len(kb)) + kb)
        if isinstance(value, bool):
            parts.append(_U32.pack(7) + _SCALARS[7].pack(value))
        elif isinstance(value, int):
            vtype = 4 if 0 <= value < 2**32 else 10
            parts.append(_U32.pack(vtype) + _SCALARS[vtype].pack(value))
        elif isinstance(value, float):
            parts.append(_U32.pack(6) + _SCALARS[6].pack(value))
        else:
            vb = str(value).encode()
            parts.append(_U32.pack(_STRING) + _U64.pack(len(vb)) + vb)
    return b"".join(parts)
