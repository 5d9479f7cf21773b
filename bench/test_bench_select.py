"""Micro-benchmarks of a whole routing decision and of request-head parsing.

    .venv/bin/pytest bench/test_bench_select.py --benchmark-only

Groups (each with its baseline first):
    decide n=64         plain acquire+release (baseline); with a model's
                        warm-backend mask; conversation affinity
                        (acquire_affine); affinity under a mask with GPU
                        loads pushed in.
    placement n=64 models=20
                        one routing decision (olb/routing.py) on a fleet with
                        2-3 models resident per backend: acquire alone
                        (baseline), a warm model (rule 1, the per-request
                        path) and a cold placement (rules 2-5 in full; see
                        docs/scheduling.md, "What a decision costs").
    request head        h11 alone on an ollama-python request head (baseline)
                        vs olb's compiled parse_request_head alone, and
                        olb's RequestReader cycle (head, body and the
                        upstream head olb writes) on the fast path and on a
                        head the fast path declines (chunked: h11 reads it).

One round of a decide group is PAIRS acquire+release pairs: divide by PAIRS.
"""

import h11
import pytest

from olb._core import BackendTable
from olb._http import parse_request_head
from olb.http import MAX_HEAD, RequestReader, upstream_head

PAIRS = 100
N = 64

BODY = b'{"model":"llama3.2","messages":[{"role":"user","content":"hi"}],"stream":true}'
REQ = (b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1:11434\r\n"
       b"User-Agent: ollama-python/0.6.3 (x86_64 linux) Python/3.11.7\r\n"
       b"Accept: application/json\r\nContent-Type: application/json\r\n"
       b"Accept-Encoding: gzip, deflate\r\nConnection: keep-alive\r\n"
       b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def table_with_load():
    table = BackendTable([8] * N, seed=1)
    held = [table.acquire() for _ in range(N * 3)]  # a fleet three requests deep
    return table, held


def run_pairs(acquire, release):
    for _ in range(PAIRS):
        release(acquire())


@pytest.mark.parametrize("case", ["plain", "model mask", "affinity", "affinity+mask+gpu"])
def test_decide(benchmark, case):
    table, _ = table_with_load()
    mask = bytearray(N)
    for i in range(0, N, 4):
        mask[i] = 1  # the model is warm on a quarter of the fleet
    if case == "plain":
        acquire = table.acquire
    elif case == "model mask":
        def acquire():
            return table.acquire(mask)
    elif case == "affinity":
        def acquire():
            return table.acquire_affine(0x5DEECE66D, None, 1.25)
    else:
        for i in range(N):
            table.set_gpu_load(i, (i % 10) / 10, 0.5)

        def acquire():
            return table.acquire_affine(0x5DEECE66D, mask, 1.25)
    benchmark.group = f"decide n={N}"
    benchmark.extra_info.update({"case": case, "pairs": PAIRS})
    benchmark(run_pairs, acquire, table.release)


def test_head_h11_only(benchmark):
    def parse():
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQ)
        conn.next_event()
        conn.next_event()
        conn.next_event()

    benchmark.group = "request head"
    benchmark.extra_info["what"] = "h11 Request + Data + EndOfMessage"
    benchmark(parse)


def test_head_fast_parser_only(benchmark):
    benchmark.group = "request head"
    benchmark.extra_info["what"] = "olb._http.parse_request_head"
    benchmark(parse_request_head, REQ, MAX_HEAD)


def test_head_olb_cycle_declined(benchmark):
    # The same request with a chunked body: declined by the fast path, read by h11.
    head, _, body = REQ.partition(b"\r\n\r\n")
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length")]
    chunked = b"\r\n".join(lines + [b"Transfer-Encoding: chunked"]) + b"\r\n\r\n"
    chunked += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    benchmark.group = "request head"
    benchmark.extra_info["what"] = "RequestReader cycle + upstream head, declined (h11)"
    benchmark(reader_cycle(chunked))


def test_head_olb_cycle(benchmark):
    benchmark.group = "request head"
    benchmark.extra_info["what"] = "RequestReader cycle + upstream head"
    benchmark(reader_cycle(REQ))


def reader_cycle(data: bytes):
    """One request cycle as the proxy runs it: read `data`, write the upstream head, finish."""
    reader = RequestReader(1 << 20)

    def cycle():
        reader.receive(data)
        req = reader.next_request()
        upstream_head(req, b"127.0.0.1:11435", b"127.0.0.1")
        reader.finish_response(200, False)

    return cycle


# --- a whole placement decision (olb/routing.py) -----------------------------------------------------------

MODELS = 20


def placement_world():
    """64 backends, 20 models installed everywhere, two or three resident on
    each backend (/api/ps read), a few requests in flight, recent demand:
    what the Router reads for one decision."""
    from types import SimpleNamespace

    from olb.models import ModelDirectory
    from olb.routing import Router

    names = [f"m{k}:latest" for k in range(MODELS)]
    table = BackendTable([8] * N, seed=1)
    models = ModelDirectory([SimpleNamespace(index=i, spec=None) for i in range(N)], 10, 1)
    for i in range(N):
        resident = [names[(i + j * 7) % (MODELS - 1)] for j in range(2 + i % 2)]
        ps = [{"name": m, "size": 5 * 10**9, "size_vram": 5 * 10**9} for m in resident]
        models.set_catalogue(i, [{"name": m} for m in names], ps)
    for i in range(0, N, 3):
        resident = [m for m, mask in models.loaded.items() if mask[i]]
        only = bytearray(N)
        only[i] = 1
        table.acquire(only)
        models.admitted(resident[0], i, 1)
    for k in range(400):
        models.admitted(names[k % (MODELS - 1)], 0, 1)
        models.admitted(names[k % (MODELS - 1)], 0, -1)
    # The cold model has been loaded before (its footprint is known, so the
    # room rule reads every backend) and has no room anywhere now.
    models.footprint[names[-1]] = 40 * 10**9
    queued = __import__("collections").Counter()
    return table, models, Router(table, models, queued, 4, 1.25), names[-1]


@pytest.mark.parametrize("case", ["acquire (baseline)", "warm", "cold"])
def test_placement(benchmark, case):
    """One routing decision at 64 backends x 20 models, its slot released:
    acquire alone (baseline), a request for a model warm on a quarter of the
    fleet (rule 1, the per-request path), and a cold placement (a model
    resident nowhere: rules 2-4 run in full)."""
    table, models, router, cold = placement_world()
    if case == "acquire (baseline)":
        mask = models.loaded_mask("m1:latest")

        def decide():
            table.release(table.acquire(mask))
    else:
        model = "m1:latest" if case == "warm" else cold

        def decide():
            decision = router.route(model)
            assert decision.kind == 0  # ADMIT
            table.release(decision.index)
    benchmark.group = f"placement n={N} models={MODELS}"
    benchmark.extra_info["case"] = case
    benchmark(decide)
