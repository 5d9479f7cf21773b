"""bench/chaos.py's classification of one request, and its reading of olb's log."""

import orjson
import pytest

from bench.chaos import _marks, classify


def _ndjson(*docs) -> bytes:
    return b"".join(orjson.dumps(d) + b"\n" for d in docs)


TOKENS = [{"response": "a", "done": False}, {"response": "b", "done": False}]


@pytest.mark.parametrize("status, body, ended, stream, expected", [
    (200, _ndjson(*TOKENS, {"done": True, "eval_count": 2}), True, True, "completed"),
    (200, _ndjson({"response": "ab", "done": True, "eval_count": 2}), True, False, "completed"),
    # More token lines than the last backend counted: continued elsewhere.
    (200, _ndjson(*TOKENS, {"done": True, "eval_count": 1}), True, True, "resumed"),
    (200, _ndjson(*TOKENS, {"error": "backend failed mid-request"}), True, True, "inband_error"),
    (502, b'{"error":"no backend reachable"}', True, False, "clean_error"),
    (503, b'{"error":"server busy"}', True, True, "clean_error"),
    (200, _ndjson(*TOKENS), False, True, "truncated"),          # connection ended mid-body
    (200, _ndjson(*TOKENS), True, True, "truncated"),           # ended, but no final line
    (None, b"", False, False, "refused"),                       # closed before any byte
    (502, b"<html>bad gateway", True, False, "truncated"),      # not Ollama's error shape
])
def test_classify(status, body, ended, stream, expected):
    assert classify(status, body, ended, stream) == expected


def test_marks_reads_olb_log_lines():
    log = ("2026-12-02 10:00:01,250 WARNING olb.balancer[42]: backend http://127.0.0.1:5001 marked down: "
           "connect to 127.0.0.1:5001 failed: Connection refused\n"
           "2026-12-02 10:00:02,000 WARNING olb.proxy[42]: stream from backend failed after the first byte\n")
    (when, url, reason), = _marks(log)
    assert url == "http://127.0.0.1:5001"
    assert reason.endswith("Connection refused")
    assert when % 1 == pytest.approx(0.25)
