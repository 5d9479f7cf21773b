#!/usr/bin/env python3
"""End to end: olb against going direct to the backend, measured in one run.

    python bench/e2e.py                       # defaults: about 35-45 s on 2 cores
    python bench/e2e.py --workers 2 --json out.json

Three processes, every socket on 127.0.0.1:

    this process (load generator, uvloop)  --->  olb (python -m olb)  --->  simulated Ollama
                                     \\-------------- direct --------------/   (python -m olb.sim)

The simulated Ollama runs with token_rate=0 and ttft=0 (it answers as fast as
it can) and enough parallel slots that it never queues, so what is measured
is HTTP handling, not inference.  Each case runs --rounds times against each
target, alternating which goes first so a drift in the machine's speed hits
both; every olb figure is also given as a ratio to the direct one.

Cases:
    version   GET /api/version (tiny JSON, Content-Length)
    generate  POST /api/generate, stream:false, num_predict=--num-predict
    stream    POST /api/generate streaming --tokens tokens; an op is one
              NDJSON line the client received

CPU figures come from /proc/<pid>/stat (utime+stime) of each process -- for
olb the supervisor and its workers when --workers > 1 -- sampled before and
after each measured phase.  Those counters tick at 1/CLK_TCK (10 ms on
Linux): each before/after difference is off by less than a tick, so the
report gives the worst case (rounds x 10 ms / CPU used), warns above 1 %,
and prints the nanosecond total from /proc/<pid>/task/*/schedstat beside it
as a cross-check.  It also warns when other processes took a noticeable
share of the machine during a phase (from /proc/stat).

The load generator is callback driven (one asyncio.Protocol per keep-alive
connection, the next request written from data_received, no coroutine per
request) because it shares the two cores with the proxy and the simulator.
Throughput therefore reflects the whole box: through olb three processes
compete for the CPUs, direct only two.  The proxy's CPU per op is the
figure that does not depend on that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

if __package__ in (None, ""):
    # Run as a script (python bench/e2e.py): make `bench` importable from the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.load import (  # noqa: E402
    build_request,
    close_conns,
    http_get_json,
    merge_counts,
    open_conns,
    percentile,
    run_phase,
    sum_errors,
)
from bench.proc import TICK_S, Child, CpuSample, cpu_delta, machine, machine_busy_ticks, other_share, process_tree  # noqa: E402

CASES = ("version", "generate", "stream")
#: Share of the machine's CPU used by other processes during a phase above which the report warns
#: (the loopback's softirq time, charged to no process, is a few per cent by itself).
BUSY_ELSEWHERE = 0.10


# --- measurement --------------------------------------------------------------------------------


async def measure_once(loop, args, case: str, host: str, port: int, pids: dict) -> dict:
    """Warm up, then one measured phase of `case` against host:port, CPU of every process around it."""
    stream = case == "stream"
    nconns = args.streams if stream else args.concurrency
    count = args.stream_requests if stream else args.requests
    warm = max(nconns, count // 10)
    request = [build_request(case, f"{host}:{port}", args.num_predict, args.tokens)] * nconns
    conns = await open_conns(loop, [(host, port)], nconns)
    try:
        warmup = await run_phase(loop, conns, request, warm, args.phase_seconds)
        before = {name: CpuSample(process_tree(pid) if name == "olb" else [pid])
                  for name, pid in pids.items()}
        busy0 = machine_busy_ticks()
        phase = await run_phase(loop, conns, request, count, args.phase_seconds)
        busy1 = machine_busy_ticks()
        after = {name: CpuSample(process_tree(pid) if name == "olb" else [pid])
                 for name, pid in pids.items()}
    finally:
        close_conns(conns)
    errors = sum_errors(warmup, phase)
    ops = phase.lines if stream else phase.completed
    cpu = {name: cpu_delta(before[name], after[name]) for name in pids}
    return {
        "other_cpu_share": other_share(busy1 - busy0, cpu, phase.elapsed),
        "requests": phase.completed,
        "warmup_requests": warmup.completed,
        "seconds": phase.elapsed,
        "ops": ops,
        "rate": ops / phase.elapsed if phase.elapsed > 0 else 0.0,
        "latencies": phase.ttfb if stream else phase.latencies,
        "lines_per_response": phase.lines_per_response,
        "errors": errors,
        "cpu": cpu,
    }


def aggregate(case: str, target: str, rounds: list[dict]) -> dict:
    """One result from several rounds: the median rate, pooled latencies, summed CPU over summed ops."""
    stream = case == "stream"
    ops = sum(r["ops"] for r in rounds)
    rates = sorted(r["rate"] for r in rounds)
    lat = sorted(x for r in rounds for x in r["latencies"])
    errors, lines = merge_counts(rounds)
    cpu = {}
    for name in rounds[0]["cpu"]:
        cpu_s = sum(r["cpu"][name]["cpu_s"] for r in rounds)
        ns_s = sum(r["cpu"][name]["cpu_s_schedstat"] for r in rounds)
        cpu[name] = {
            "cpu_s": cpu_s,
            "cpu_s_schedstat": ns_s,
            "us_per_op": cpu_s / ops * 1e6 if ops else float("nan"),
            "us_per_op_schedstat": ns_s / ops * 1e6 if ops else float("nan"),
            # Each before/after pair is off by less than one tick: worst case, one per round.
            "resolution": len(rounds) * TICK_S / cpu_s if cpu_s > 0 else float("inf"),
            "same_processes": all(r["cpu"][name]["same_processes"] for r in rounds),
        }
    return {
        "case": case,
        "target": target,
        "rounds": len(rounds),
        "requests": sum(r["requests"] for r in rounds),
        "warmup_requests": sum(r["warmup_requests"] for r in rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "chunks": ops if stream else None,
        "rate": statistics.median(rates),
        "rate_min": rates[0],
        "rate_max": rates[-1],
        "unit": "chunks/s" if stream else "req/s",
        "latency": "first byte" if stream else "full response",
        "p50_ms": percentile(lat, 0.50) * 1e3,
        "p99_ms": percentile(lat, 0.99) * 1e3,
        "lines_per_response": {str(k): v for k, v in sorted(lines.items())},
        "other_cpu_share": max(r["other_cpu_share"] for r in rounds),
        "errors": errors,
        "cpu": cpu,
    }


async def bench(args, sim: Child, olb: Child) -> list[dict]:
    loop = asyncio.get_running_loop()
    sim_host, sim_port = sim.found[0].split("//")[1].split(":")
    olb_host, olb_port = olb.found[0].split(":")
    admin_host, admin_port = olb.found[1].split(":")
    targets = {"direct": (sim_host, int(sim_port)), "olb": (olb_host, int(olb_port))}
    pids = {"client": os.getpid(), "sim": sim.pid, "olb": olb.pid}
    results = []
    for case in args.cases:
        status0 = await http_get_json(admin_host, int(admin_port), "/olb/status")
        runs: dict[str, list[dict]] = {"direct": [], "olb": []}
        for i in range(args.rounds):
            # Alternate the order so a drift in the machine's speed hits both sides alike.
            for target in (("direct", "olb") if i % 2 == 0 else ("olb", "direct")):
                runs[target].append(await measure_once(loop, args, case, *targets[target], pids))
        for target in ("direct", "olb"):
            r = aggregate(case, target, runs[target])
            results.append(r)
            print(f"  {case:8} {target:6} {r['rate']:10.0f} {r['unit']:8} "
                  f"(rounds {r['rate_min']:.0f}..{r['rate_max']:.0f})  "
                  f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                  f"olb {r['cpu']['olb']['us_per_op']:6.1f} us/op  "
                  f"sim {r['cpu']['sim']['us_per_op']:6.1f} us/op  "
                  f"others {r['other_cpu_share']:4.0%}"
                  + (f"  ERRORS {r['errors']}" if r["errors"] else ""), flush=True)
        # olb's own books must balance: nothing left in flight, every request counted once.
        status = await http_get_json(admin_host, int(admin_port), "/olb/status")
        r["olb_status"] = {
            "inflight_after": sum(b["inflight"] for b in status["backends"]),
            "served_delta": (sum(b["served"] for b in status["backends"])
                             - sum(b["served"] for b in status0["backends"])),
            "expected_served": r["requests"] + r["warmup_requests"],
            "queue": status["queue"],
            "rejected": status["rejected"],
            "idle_connections": sum(b["idle_connections"] for b in status["backends"]),
        }
    return results


# --- report -------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table, an olb/direct ratio row per case, then notes and warnings."""
    rows = [
        "| case | target | throughput (median, range) | p50 ms | p99 ms | olb CPU µs/op | "
        "sim CPU µs/op | client CPU µs/op | all CPU µs/op |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    warnings = []
    by_case: dict[str, dict[str, dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], {})[r["target"]] = r
    for case, pair in by_case.items():
        for target in ("direct", "olb"):
            r = pair.get(target)
            if r is None:
                continue
            c = r["cpu"]
            total = sum(v["us_per_op"] for v in c.values())
            olb_cpu = f"{c['olb']['us_per_op']:.1f}" if target == "olb" else f"({c['olb']['us_per_op']:.1f})"
            rows.append(f"| {case} | {target} | {r['rate']:,.0f} ({r['rate_min']:,.0f}–{r['rate_max']:,.0f}) "
                        f"{r['unit']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {olb_cpu} | "
                        f"{c['sim']['us_per_op']:.1f} | {c['client']['us_per_op']:.1f} | {total:.1f} |")
            if target == "olb" and c["olb"]["resolution"] > 0.01:
                warnings.append(f"{case}: olb used {c['olb']['cpu_s']:.2f} s of CPU: tick resolution "
                                f"{c['olb']['resolution']:.1%} (> 1 %); use more requests")
            if r["errors"]:
                warnings.append(f"{case} {target}: errors {r['errors']}")
            if r["other_cpu_share"] > BUSY_ELSEWHERE:
                warnings.append(f"{case} {target}: up to {r['other_cpu_share']:.0%} of the machine's CPU "
                                f"went to other processes during a round: rates and latencies are "
                                f"unreliable (per-op CPU less so); rerun on a quiet machine")
            if not c["olb"]["same_processes"]:
                warnings.append(f"{case} {target}: an olb process exited or appeared during a phase")
            if len(r["lines_per_response"]) > 1 and case == "stream":
                warnings.append(f"{case} {target}: streams of unequal length {r['lines_per_response']}")
            st = r.get("olb_status")
            if st and (st["inflight_after"] or st["served_delta"] != st["expected_served"]
                       or st["rejected"]):
                warnings.append(f"{case}: olb's status after the case does not balance: {st}")
        d, o = pair.get("direct"), pair.get("olb")
        if d and o:
            dtot = sum(v["us_per_op"] for v in d["cpu"].values())
            otot = sum(v["us_per_op"] for v in o["cpu"].values())
            olb_vs_sim = o["cpu"]["olb"]["us_per_op"] / d["cpu"]["sim"]["us_per_op"]
            rows.append(f"| {case} | **olb/direct** | **{_ratio(o['rate'], d['rate'])}** | "
                        f"{_ratio(o['p50_ms'], d['p50_ms'])} | {_ratio(o['p99_ms'], d['p99_ms'])} | "
                        f"{olb_vs_sim:.2f}x sim | "
                        f"{_ratio(o['cpu']['sim']['us_per_op'], d['cpu']['sim']['us_per_op'])} | "
                        f"{_ratio(o['cpu']['client']['us_per_op'], d['cpu']['client']['us_per_op'])} | "
                        f"{_ratio(otot, dtot)} |")
    res = [f"{r['case']} {r['cpu']['olb']['cpu_s']:.2f} s (±{r['cpu']['olb']['resolution']:.1%}; "
           f"schedstat {r['cpu']['olb']['cpu_s_schedstat']:.3f} s)" for r in results if r["target"] == "olb"]
    out = "\n".join(rows)
    out += ("\n\nop = one response (version, generate) or one NDJSON line (stream). Latency: full "
            "response, or time to the response head for stream. Throughput: median of the rounds. "
            "olb CPU on a direct row (in parentheses) is olb idling meanwhile; on the ratio row, olb's "
            "CPU per op over the simulator's in the direct run. olb CPU per case, summed over the rounds "
            "(worst-case tick error: one 10 ms tick per round; the nanosecond schedstat total as a "
            "cross-check): " + "; ".join(res) + ".")
    if warnings:
        out += "\n\nWarnings:\n" + "\n".join(f"- {w}" for w in warnings)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--requests", type=int, default=7000,
                   help="measured non-streaming requests per case, target and round (warm-up: a tenth)")
    p.add_argument("--concurrency", type=int, default=32, help="keep-alive connections, non-streaming")
    p.add_argument("--streams", type=int, default=4, help="concurrent streaming requests")
    p.add_argument("--stream-requests", type=int, default=160,
                   help="measured streaming requests per target and round")
    p.add_argument("--tokens", type=int, default=2000, help="num_predict of each streaming request")
    p.add_argument("--num-predict", type=int, default=16, help="num_predict of the non-streaming generate")
    p.add_argument("--rounds", type=int, default=3,
                   help="direct/olb measurements per case, alternating which goes first; the table "
                        "gives the median rate, pooled latencies and CPU summed over the rounds")
    p.add_argument("--token-rate", type=float, default=0.0,
                   help="the simulator's tokens/s per request (0: as fast as possible)")
    p.add_argument("--olb-max", type=int, default=0,
                   help="olb's per-backend max (;max=N); 0: the larger of --concurrency and --streams, "
                        "so olb never queues")
    p.add_argument("--workers", type=int, default=1, help="OLB_WORKERS")
    p.add_argument("--backends", type=int, default=1,
                   help="simulated instances behind olb (direct always uses the first)")
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated subset of: " + ", ".join(CASES))
    p.add_argument("--phase-seconds", type=float, default=12.0,
                   help="wall-time cap of one phase (requests stop being sent after it)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop of the load generator")
    p.add_argument("--pin", action="store_true",
                   help="pin olb to the last CPU, the simulator and this process to the others")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in args.cases if c not in CASES]
    if bad:
        p.error(f"unknown case(s): {', '.join(bad)}")
    for name in ("requests", "concurrency", "streams", "stream_requests", "tokens", "num_predict",
                 "workers", "backends", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    slots = max(args.concurrency, args.streams)
    info = machine()
    cmd = "python bench/e2e.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {cmd}\n# {info['nproc']} CPUs, {info['cpu']}, Python {info['python']}", flush=True)
    sim = Child([sys.executable, "-m", "olb.sim", "--host", "127.0.0.1", "--port", "0",
                 "--count", str(args.backends), "--parallel", str(slots), "--max-queue", "4096",
                 "--token-rate", str(args.token_rate), "--ttft", "0", "--seed", "1"],
                None, rb"^(http://\S+)", args.backends)
    olb = None
    try:
        env = dict(os.environ,
                   OLB_BACKENDS=",".join(f"{u};max={args.olb_max or slots}" for u in sim.found),
                   OLB_LISTEN="127.0.0.1:0", OLB_WORKERS=str(args.workers), OLB_HEALTH_INTERVAL="0",
                   OLB_GPU_POLL="0", OLB_MAX_INFLIGHT=str(args.olb_max or slots), OLB_LOG_LEVEL="warning",
                   OLB_ADMIN_LISTEN="127.0.0.1:0")
        # Two lines: the data port, then the admin listener's (/olb/status).
        olb = Child([sys.executable, "-m", "olb"], env, rb"(?:listening|admin) on http://(\S+)", 2)
        if args.pin:
            ncpu = os.cpu_count() or 1
            if ncpu < 2:
                print("--pin needs at least 2 CPUs; not pinning", file=sys.stderr)
            else:
                for pid in process_tree(olb.pid):
                    os.sched_setaffinity(pid, {ncpu - 1})
                rest = set(range(ncpu - 1))
                os.sched_setaffinity(sim.pid, rest)
                os.sched_setaffinity(0, rest)
        if args.loop == "uvloop":
            import uvloop

            results = uvloop.run(bench(args, sim, olb))
        else:
            results = asyncio.run(bench(args, sim, olb))
    finally:
        if olb is not None:
            olb.stop()
        sim.stop()
    table = markdown(results)
    print()
    print(table)
    # olb-sim always announces itself on stderr ("olb-sim: 1 instance(s), ..."): not news.
    for child, name, skip in ((olb, "olb", ""), (sim, "sim", "olb-sim: ")):
        tail = child.stderr_tail(skip=skip) if child is not None else ""
        if tail.strip():
            print(f"\n{name} stderr (tail):\n{tail}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "machine": info, "args": vars(args),
                       "results": results, "table": table}, f, indent=2)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
