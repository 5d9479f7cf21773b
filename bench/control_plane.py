"""Control plane under load: how fast olb answers requests that run no model while every slot is busy.

    python -m bench control                 # 2 simulated backends, ~10 s
    python -m bench control --requests 500

The `ollama` CLI sends `HEAD /` before each command, and clients poll
`/api/version`, `/api/tags` and `/api/show`; one Ollama answers them in a
millisecond whatever its GPUs are doing. olb must too (docs/operations.md,
"Requests that wait for a slot, and those that do not"). This fills every
inference slot of every backend with slow streams, queues more behind them
in olb, then times each control request, one after another on one
keep-alive connection, through olb and, in the same run, straight to a
backend (the reference). Everything runs in one process on 127.0.0.1, so
the figures include the load generator's own event loop: read the ratio to
direct, not the milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import orjson

CASES = [
    ("HEAD", "/", None),
    ("GET", "/api/version", None),
    ("GET", "/api/tags", None),
    ("POST", "/api/show", {"model": "llama3.2"}),
]


def _request(method: str, path: str, body) -> bytes:
    data = orjson.dumps(body) if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + data


async def _read_response(reader, method: str) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if method == "HEAD":
        return status
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    if length:
        await reader.readexactly(length)
    return status


async def _time_cases(port: int, n: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = {}
    try:
        for method, path, body in CASES:
            times = []
            raw = _request(method, path, body)
            for _ in range(n):
                t = time.perf_counter()
                writer.write(raw)
                status = await asyncio.wait_for(_read_response(reader, method), 30)
                times.append(time.perf_counter() - t)
                if status != 200:
                    raise RuntimeError(f"{method} {path} answered {status}")
            times.sort()
            out[f"{method} {path}"] = (statistics.median(times), times[int(0.99 * (len(times) - 1))])
    finally:
        writer.close()
    return out


async def _hold(port: int, n: int) -> list:
    """n streamed generations that run for the whole measurement (their
    connections are closed at the end, which stops them)."""
    body = {"model": "llama3.2", "prompt": "hold", "options": {"num_predict": 100000}}
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request("POST", "/api/generate", body))
        conns.append((reader, writer))
    return conns


async def run(args) -> dict:
    from olb import config as config_mod
    from olb.server import start_proxy
    from olb.sim import SimConfig, start_sim

    sims = [await start_sim(SimConfig(token_rate=5, ttft=0, seed=1, num_parallel=args.slots))
            for _ in range(args.backends)]
    cfg = config_mod.load([], {
        "OLB_BACKENDS": ",".join(f"{s.url};max={args.slots}" for s in sims),
        "OLB_LISTEN": "127.0.0.1:0", "OLB_ADMIN_LISTEN": "off", "OLB_HEALTH_INTERVAL": "0",
        "OLB_METRICS": "off", "OLB_QUEUE_TIMEOUT": "600"})
    proxy = await start_proxy(cfg)
    await proxy.balancer.models.refresh_all()
    held = []
    try:
        busy = args.backends * args.slots
        held = await _hold(proxy.port, busy + args.queued)
        deadline = time.monotonic() + 20
        while (sum(proxy.balancer.table.inflight(i) for i in range(args.backends)) < busy
               or len(proxy.balancer.queue) < args.queued):
            if time.monotonic() > deadline:
                raise RuntimeError("the slots did not fill within 20 s")
            await asyncio.sleep(0.01)
        through = await _time_cases(proxy.port, args.requests)
        direct = await _time_cases(sims[0].port, args.requests)
        queued = len(proxy.balancer.queue)
        inflight = sum(proxy.balancer.table.inflight(i) for i in range(args.backends))
    finally:
        for _, writer in held:
            writer.close()
        await proxy.close()
        for s in sims:
            await s.close()
    return {"through": through, "direct": direct, "inflight": inflight, "queued": queued, "args": vars(args)}


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"Every slot busy ({result['inflight']} streams in flight on {a['backends']} backends, "
             f"max={a['slots']} each) and {result['queued']} more waiting in olb's queue; "
             f"{a['requests']} requests per case, one after another on one keep-alive connection.", "",
             "| request | olb p50 ms | olb p99 ms | direct p50 ms | direct p99 ms | p50 olb ÷ direct |",
             "|---|---|---|---|---|---|"]
    for case, (p50, p99) in result["through"].items():
        d50, d99 = result["direct"][case]
        lines.append(f"| `{case}` | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {d50 * 1e3:.2f} | {d99 * 1e3:.2f} | "
                     f"{p50 / d50:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench control", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--slots", type=int, default=2, help="max= per backend, and the sims' parallel slots")
    ap.add_argument("--queued", type=int, default=8, help="requests left waiting in olb's queue")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per case")
    args = ap.parse_args(argv)
    import uvloop

    print(markdown(uvloop.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
