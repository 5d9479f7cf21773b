"""olb.sim.gguf (header key/values) and catalogue.spec_from_gguf, table-driven."""

import struct

import pytest

from olb.sim import gguf
from olb.sim.catalogue import human_number, spec_from_gguf

KV = {"general.architecture": "llama", "general.parameter_count": 8_030_261_248, "general.file_type": 15,
      "llama.context_length": 131072, "llama.block_count": 32, "general.name": "x", "flag": True,
      "ratio": 0.5}


def _array_kv(n):
    # An array of n uint32 before a scalar key: skipped, counted.
    key = b"tokenizer.ggml.token_type"
    return (struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 4, n) + b"\0" * 4 * n)


@pytest.mark.parametrize("data, expected", [
    (gguf.write(KV), {**KV, "ratio": 0.5}),
    (gguf.write(KV)[:-10], {k: v for k, v in KV.items() if k != "ratio"}),   # cut inside the last value
    (struct.pack("<4sIQQ", b"GGUF", 3, 0, 2) + _array_kv(3) + gguf.write({"a": 1})[24:],
     {"tokenizer.ggml.token_type": 3, "a": 1}),
])
def test_read_kv(data, expected):
    assert gguf.read_kv(data) == expected


@pytest.mark.parametrize("data", [b"", b"GGML" + b"\0" * 20, struct.pack("<4sIQQ", b"GGUF", 1, 0, 0)])
def test_read_kv_refuses_other_files(data):
    with pytest.raises(ValueError):
        gguf.read_kv(data)


@pytest.mark.parametrize("n, text", [
    (8_030_261_248, "8.0B"), (70_000_000_000, "70B"), (494_032_768, "494.03M"), (2_000_000, "2M"),
    (1_500, "2K"), (999, "999"),
])
def test_human_number(n, text):
    assert human_number(n) == text


@pytest.mark.parametrize("size, kv, arch, quant, ctx, psize, embedding", [
    (4_920_753_328, KV, "llama", "Q4_K_M", 131072, "8.0B", False),
    # No metadata: the nearest built-in by size fills in.
    (1_300_000_000, {}, "llama", "Q8_0", 131072, "1.2B", False),
    (270_000_000, {"general.architecture": "nomic-bert", "nomic-bert.pooling_type": 1}, "nomic-bert", "F16",
     2048, "134.58M", True),
])
def test_spec_from_gguf(size, kv, arch, quant, ctx, psize, embedding):
    spec = spec_from_gguf("m:latest", size, kv)
    assert (spec.architecture, spec.quantization_level, spec.context_length, spec.parameter_size,
            spec.embedding_only, spec.size) == (arch, quant, ctx, psize, embedding, size)
