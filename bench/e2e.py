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
import glob
import json
import os
import platform
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
TICK_S = 1.0 / CLK_TCK
MODEL = "llama3.2"
CASES = ("version", "generate", "stream")
#: Seconds to wait for a child process to print its address.
START_TIMEOUT = 20.0
#: Share of the machine's CPU used by other processes during a phase above which the report warns
#: (the loopback's softirq time, charged to no process, is a few per cent by itself).
BUSY_ELSEWHERE = 0.10
#: Extra seconds a phase may take past its deadline to finish requests in flight.
GRACE = 10.0


# --- /proc accounting --------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # Field 2 (comm) is in parentheses and may hold spaces: split after the last ')'.
    return raw[raw.rfind(b")") + 2:].split()


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (olb's supervisor and its forked workers)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


class CpuSample:
    """utime+stime ticks (and schedstat ns) of a set of processes at one instant."""

    __slots__ = ("pids", "ticks", "ns")

    def __init__(self, pids: list[int]):
        self.pids = frozenset(pids)
        self.ticks = 0
        self.ns = 0
        for pid in pids:
            try:
                f = _stat_fields(pid)
                # Fields 14 and 15 (utime, stime); index 0 here is field 3.
                self.ticks += int(f[11]) + int(f[12])
            except (OSError, IndexError, ValueError):
                continue
            for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
                try:
                    with open(path, "rb") as fh:
                        self.ns += int(fh.read().split()[0])
                except (OSError, IndexError, ValueError):
                    pass


def machine_busy_ticks() -> int:
    """CPU ticks the whole machine spent busy (user, nice, system, irq, softirq, steal)."""
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return user + nice + system + irq + softirq + steal


def cpu_delta(before: CpuSample, after: CpuSample) -> dict:
    return {
        "cpu_s": (after.ticks - before.ticks) * TICK_S,
        "cpu_s_schedstat": (after.ns - before.ns) / 1e9,
        # A worker that died and was replaced mid-phase takes its CPU time with it.
        "same_processes": before.pids == after.pids,
    }


# --- child processes ----------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the forked child, before exec: SIGTERM when this benchmark dies, even by SIGKILL."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Child:
    """A child process whose stdout announces where it listens; stderr goes to a temp file."""

    def __init__(self, argv: list[str], env: dict | None, pattern: bytes, lines: int):
        self.errfile = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.errfile, preexec_fn=_die_with_parent)
        self.found: list[str] = []
        deadline = time.monotonic() + START_TIMEOUT
        fd = self.proc.stdout.fileno()
        pending = b""
        while len(self.found) < lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.stop()
                raise RuntimeError(f"{' '.join(argv)}: no address within {START_TIMEOUT:g} s:\n"
                                   f"{self.stderr_tail()}")
            data = os.read(fd, 4096)
            if not data:
                self.stop()
                raise RuntimeError(f"{' '.join(argv)} exited early:\n{self.stderr_tail()}")
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                m = re.search(pattern, line)
                if m and len(self.found) < lines:
                    self.found.append(m.group(1).decode())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_tail(self, limit: int = 4000, skip: str = "") -> str:
        """The end of what the child wrote to stderr, without lines starting with `skip`."""
        self.errfile.seek(0)
        text = self.errfile.read().decode(errors="replace")
        if skip:
            text = "".join(line for line in text.splitlines(True) if not line.startswith(skip))
        return text[-limit:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- the load generator -------------------------------------------------------------------------

HEAD, BODY, CSIZE, CDATA, CCRLF, TRAILER = range(6)


class Phase:
    """One batch of requests spread over keep-alive connections; bounded in count and time."""

    def __init__(self, loop, request: bytes, count: int, seconds: float, conns: int):
        self.loop = loop
        self.request = request
        self.remaining = count
        self.seconds = seconds
        self.deadline = 0.0
        self.latencies: list[float] = []     # seconds per complete response
        self.ttfb: list[float] = []          # seconds to the response head
        self.lines_per_response: dict[int, int] = {}
        self.lines = 0
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.active = conns
        self.done = loop.create_future()
        self.started = 0.0
        self.elapsed = 0.0

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def conn_idle(self) -> None:
        self.active -= 1
        if self.active == 0 and not self.done.done():
            self.elapsed = time.perf_counter() - self.started
            self.done.set_result(None)


class ClientConn(asyncio.Protocol):
    """One keep-alive connection: a request, its response, the next request -- from callbacks."""

    __slots__ = ("transport", "phase", "state", "left", "buf", "t0", "lines", "status", "connected",
                 "closed")

    def __init__(self, loop):
        self.transport = None
        self.phase: Phase | None = None
        self.state = HEAD
        self.left = 0
        self.buf = b""
        self.t0 = 0.0
        self.lines = 0
        self.status = 0
        self.connected = loop.create_future()
        self.closed = False

    def connection_made(self, transport):
        self.transport = transport
        self.connected.set_result(None)

    def connection_lost(self, exc):
        self.closed = True
        phase = self.phase
        if phase is not None:
            self.phase = None
            phase.error("connection lost" if exc is None else f"connection lost: {exc!r}")
            phase.conn_idle()

    def start(self, phase: Phase) -> None:
        self.phase = phase
        if self.closed:
            self.phase = None
            phase.error("connection closed before the phase")
            phase.conn_idle()
            return
        self._next()

    def _next(self) -> None:
        phase = self.phase
        if phase.remaining <= 0 or time.perf_counter() > phase.deadline:
            self.phase = None
            phase.conn_idle()
            return
        phase.remaining -= 1
        self.state = HEAD
        self.lines = 0
        self.t0 = time.perf_counter()
        self.transport.write(phase.request)

    def _finish(self) -> None:
        phase = self.phase
        now = time.perf_counter()
        phase.latencies.append(now - self.t0)
        phase.completed += 1
        phase.lines += self.lines
        if self.status != 200:
            phase.error(f"status {self.status}")
        counts = phase.lines_per_response
        counts[self.lines] = counts.get(self.lines, 0) + 1
        self._next()

    def data_received(self, data: bytes) -> None:
        if self.phase is None:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == CDATA or state == BODY:
                take = n - pos
                if take > self.left:
                    take = self.left
                if state == CDATA:
                    self.lines += data.count(b"\n", pos, pos + take)
                pos += take
                self.left -= take
                if self.left == 0:
                    if state == CDATA:
                        self.state = CCRLF
                    else:
                        self._finish()
            elif state == CCRLF:
                if n - pos < 2:
                    break
                pos += 2
                self.state = CSIZE
            elif state == CSIZE:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(data[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size:
                    self.left = size
                    self.state = CDATA
                else:
                    self.state = TRAILER
            elif state == TRAILER:
                end = data.find(b"\r\n", pos)
                if end < 0:
                    break
                empty = end == pos  # an empty line ends the (usually absent) trailer section
                pos = end + 2
                if empty:
                    self._finish()
                    if self.phase is None:
                        return
            else:  # HEAD
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = data[pos:end].lower()
                pos = end + 4
                self.status = int(head[9:12])
                self.phase.ttfb.append(time.perf_counter() - self.t0)
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.left = int(head[i + 17:j if j >= 0 else len(head)])
                    self.state = BODY
                    if self.left == 0:
                        self._finish()
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.state = CSIZE
                else:
                    self.phase.error("response without a length")
                    self.transport.abort()
                    return
                if self.phase is None:
                    return
        if pos < n:
            self.buf = data[pos:]


async def open_conns(loop, host: str, port: int, count: int) -> list[ClientConn]:
    conns = []
    for _ in range(count):
        conn = ClientConn(loop)
        await loop.create_connection(lambda c=conn: c, host, port)
        await conn.connected
        conns.append(conn)
    return conns


async def run_phase(loop, conns: list[ClientConn], request: bytes, count: int, seconds: float) -> Phase:
    phase = Phase(loop, request, count, seconds, len(conns))
    phase.started = time.perf_counter()
    phase.deadline = phase.started + seconds
    for conn in conns:
        conn.start(phase)
    try:
        await asyncio.wait_for(asyncio.shield(phase.done), seconds + GRACE)
    except asyncio.TimeoutError:
        phase.error("phase did not finish: responses stuck in flight")
        for conn in conns:
            if conn.phase is not None:
                conn.transport.abort()
        phase.elapsed = time.perf_counter() - phase.started
    return phase


# --- requests -----------------------------------------------------------------------------------


def build_request(case: str, hostport: str, num_predict: int, tokens: int) -> bytes:
    if case == "version":
        return (f"GET /api/version HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: olb-bench\r\n"
                f"Accept: */*\r\n\r\n").encode()
    if case == "generate":
        body = {"model": MODEL, "prompt": "Why is the sky blue?", "stream": False,
                "options": {"num_predict": num_predict}}
    else:
        body = {"model": MODEL, "prompt": "Tell me a long story.", "options": {"num_predict": tokens}}
    raw = json.dumps(body, separators=(",", ":")).encode()
    return (f"POST /api/generate HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: olb-bench\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode() + raw


async def http_get_json(host: str, port: int, path: str) -> dict:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return json.loads(body)


# --- measurement --------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


async def measure_once(loop, args, case: str, host: str, port: int, pids: dict) -> dict:
    """Warm up, then one measured phase of `case` against host:port, CPU of every process around it."""
    stream = case == "stream"
    nconns = args.streams if stream else args.concurrency
    count = args.stream_requests if stream else args.requests
    warm = max(nconns, count // 10)
    request = build_request(case, f"{host}:{port}", args.num_predict, args.tokens)
    conns = await open_conns(loop, host, port, nconns)
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
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
    errors = dict(warmup.errors)
    for key, n in phase.errors.items():
        errors[key] = errors.get(key, 0) + n
    ops = phase.lines if stream else phase.completed
    cpu = {name: cpu_delta(before[name], after[name]) for name in pids}
    # Busy time of the machine not spent by our three processes: other people's work (it skews
    # throughput, not the per-op CPU figures), plus softirq time the kernel charges to no process.
    other = (busy1 - busy0) * TICK_S - sum(d["cpu_s"] for d in cpu.values())
    return {
        "other_cpu_share": max(0.0, other) / (phase.elapsed * (os.cpu_count() or 1)),
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
    errors: dict[str, int] = {}
    lines: dict[int, int] = {}
    for r in rounds:
        for key, n in r["errors"].items():
            errors[key] = errors.get(key, 0) + n
        for key, n in r["lines_per_response"].items():
            lines[key] = lines.get(key, 0) + n
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
    targets = {"direct": (sim_host, int(sim_port)), "olb": (olb_host, int(olb_port))}
    pids = {"client": os.getpid(), "sim": sim.pid, "olb": olb.pid}
    results = []
    for case in args.cases:
        status0 = await http_get_json(olb_host, int(olb_port), "/olb/status")
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
        status = await http_get_json(olb_host, int(olb_port), "/olb/status")
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


def machine() -> dict:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release(), "clk_tck": CLK_TCK}


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
                   OLB_GPU_POLL="0", OLB_MAX_INFLIGHT=str(args.olb_max or slots), OLB_LOG_LEVEL="warning")
        olb = Child([sys.executable, "-m", "olb"], env, rb"listening on http://(\S+)", 1)
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
