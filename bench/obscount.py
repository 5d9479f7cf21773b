"""The request-end work of metrics and the access log, counted in instructions.

`python -m bench overhead` times olb with observation on and off, and on a
shared machine its spread is larger than what it measures. This runs
metrics.observe (and the token read) on one finished non-streamed
`/api/generate` exchange N times, so that valgrind can count the
instructions each part adds; the count does not move with the machine's load:

    for m in none tok met acc obs; do
        valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$m python -m bench.obscount 20000 $m 2>&1 | grep refs
    done

Modes: none (the loop alone), tok (metrics.response_tokens), met (+ the
counters), acc (+ the access line, no counters), obs (both). A part's cost
per request: (its total - the one it adds to) / N. The exchange and the
client are stand-ins with the attributes observe reads (the exchange a
metrics.Observed, the base of proxy.Exchange that observe reads as C fields).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import types

from olb._relay import monotonic
from olb.accesslog import AccessLog
from olb.http import ProxyRequest
from olb.metrics import Metrics, Observed, observe, response_tokens

#: Ollama's last line of a non-streamed /api/generate (api/types.go GenerateResponse).
LAST = (b'{"model":"llama3.2:latest","created_at":"2024-01-01T00:00:00Z","response":"hello there",'
        b'"done":true,"done_reason":"stop","context":[1,2,3],"total_duration":123456,"load_duration":1234,'
        b'"prompt_eval_count":12,"prompt_eval_duration":1234,"eval_count":34,"eval_duration":123456}')
MODES = ("none", "tok", "met", "acc", "obs")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit() or argv[1] not in MODES:
        print(f"usage: python -m bench.obscount N {{{','.join(MODES)}}}", file=sys.stderr)
        return 2
    n, mode = int(argv[0]), argv[1]
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        access = AccessLog(os.path.join(tmp, "access.log"), "text", loop) if mode in ("acc", "obs") else None
        ctx = types.SimpleNamespace(metrics=Metrics(1) if mode in ("met", "obs") else None, access_log=access)
        t = monotonic()
        client = types.SimpleNamespace(t0=t - 0.003, peer_ip=b"127.0.0.1")
        # The exchange: an Observed (proxy.Exchange's base), as observe reads it.
        ex = Observed()
        ex.req = ProxyRequest(b"POST", b"/api/generate", b"1.1", [(b"host", b"127.0.0.1")], b"{}", True, True)
        ex.t_first, ex.t_admit, ex.slot, ex.sent = t - 0.001, t - 0.0029, True, 300
        ex.served, ex.name = "http://127.0.0.1:11434", "llama3.2:latest"
        reads, observing = mode != "none", mode in ("met", "acc", "obs")
        for _ in range(n):
            if reads:
                ex.tokens = response_tokens(None, None, LAST)
            if observing:
                observe(ctx, client, ex, 200)
        if access is not None:
            access.close()
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
