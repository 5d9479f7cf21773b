"""The compiled token reader (olb/_tokens.pyx) answers what its regex original did.

tests/tokens_reference.py is the Python that olb/metrics.py ran before; here
both read the same tails: the ends of real Ollama and OpenAI-compatible
bodies, every suffix of them (a tail is cut anywhere), hand-written edge
cases, and seeded random mutations aimed at the digits, spaces, commas and
field names the rules look at.
"""

import random

import pytest

from olb import _tokens, metrics
from tests import tokens_reference as reference

#: Ends of bodies as the backends write them.
CORPUS = [
    # Ollama, non-streamed /api/generate (Go's field order, api/types.go).
    b'{"model":"llama3.2","created_at":"2026-12-02T10:00:00.000000Z","response":"Hello there","done":true,'
    b'"done_reason":"stop","context":[1,2,3],"total_duration":512000000,"load_duration":1000,'
    b'"prompt_eval_count":26,"prompt_eval_duration":130000000,"eval_count":298,"eval_duration":4709000000}',
    # Ollama's last NDJSON line of a chat stream, in its chunk framing.
    b'4f\r\n{"model":"m","message":{"role":"assistant","content":"a"},"done":false}\n\r\n'
    b'c8\r\n{"model":"m","created_at":"x","message":{"role":"assistant","content":""},"done":true,'
    b'"done_reason":"stop","total_duration":9,"load_duration":1,"prompt_eval_count":12,'
    b'"prompt_eval_duration":5,"eval_count":34,"eval_duration":2000000000}\n\r\n0\r\n\r\n',
    # A cached prompt: no prompt_eval_duration; spaces after the colons.
    b'{"done":true,"prompt_eval_count": 7,"eval_count": 8,"eval_duration": 500000000}\n',
    b'{"done":true,"prompt_eval_count":1,"eval_count":2}\n',
    # /api/embed and /api/embeddings.
    b'{"model":"e","embeddings":[[0.1,0.2]],"total_duration":1,"load_duration":1,"prompt_eval_count":9}',
    b'{"embedding":[0.5,0.25]}',
    # OpenAI-compatible: a whole answer, and a stream's usage chunk before [DONE].
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}\n',
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
    b'data: [DONE]\n\n',
    b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n',
    # Other orders, and quoted names inside generated text (escaped: no match).
    b'{"eval_duration":1000,"eval_count":4,"prompt_eval_count":2}',
    b'{"completion_tokens":6}', b'{"prompt_tokens":6}',
    b'{"response":"\\"eval_count\\": 99","done":false}\n',
    b'{"prompt_eval_count":3,"prompt_eval_duration":x,"eval_count":5}',
    b'{"prompt_eval_count":12345678901234567890123,"eval_count":1}',
    b'{"status":"success"}\n', b'',
]

#: What mutations insert: the rules' own pieces, and the bytes around them.
PIECES = [b'"prompt_eval_count":', b',"prompt_eval_duration":', b',"eval_count":', b',"eval_duration":',
          b'"usage":', b'{"prompt_tokens":', b',"completion_tokens":', b'"eval_count":', b'"eval_duration":',
          b'"completion_tokens":', b'"prompt_tokens":', b" ", b"  ", b",", b"0", b"7", b"12", b"\\", b'"',
          b"99999999999999999999", b"\n", b"\r\n0\r\n\r\n"]


def same(tail: bytes) -> None:
    assert _tokens.read_tokens(tail) == reference.read_tokens(tail), tail


@pytest.mark.parametrize("body", CORPUS)
def test_bodies_and_all_their_suffixes_agree(body):
    for cut in range(len(body) + 1):
        same(body[cut:])
        same(body[:cut])


def test_answers_on_real_bodies():
    assert metrics.read_tokens(CORPUS[0]) == (26, 298, 4.709)
    assert metrics.read_tokens(CORPUS[6]) == (5, 6, None)
    assert metrics.read_tokens(CORPUS[4]) == (9, 0, None)
    assert metrics.read_tokens(CORPUS[12]) is None
    # A number too long for C is read by int(), as the regex's int() read it.
    assert metrics.read_tokens(CORPUS[14]) == (12345678901234567890123, 1, None)


def test_random_mutations_agree():
    rng = random.Random(20261202)
    for _ in range(6000):
        data = bytearray(rng.choice(CORPUS))
        for _ in range(rng.randrange(1, 4)):
            op = rng.random()
            at = rng.randrange(len(data) + 1)
            if op < 0.4:
                data[at:at] = rng.choice(PIECES)
            elif op < 0.7 and data:
                del data[at:at + rng.randrange(1, 6)]
            elif data:
                data[min(at, len(data) - 1)] = rng.choice(b'0123456789 ,:"{}x')
        same(bytes(data))


def test_response_tokens_reads_across_the_last_reads():
    rng = random.Random(20261203)
    for body in CORPUS:
        for _ in range(40):
            a, b = sorted(rng.randrange(len(body) + 1) for _ in range(2))
            parts = [body[:a] or None, body[a:b] or None, body[b:]]
            got = metrics.response_tokens(*parts)
            assert got == reference.response_tokens(*parts), parts
    # Past TAIL_BYTES the start of a body is not read.
    filler = b"x" * (2 * metrics.TAIL_BYTES)
    assert metrics.response_tokens(None, None, CORPUS[2] + filler) is None
    assert metrics.response_tokens(CORPUS[2], filler, b"") is None
    assert metrics.response_tokens(filler, CORPUS[2], b"") == (7, 8, 0.5)
