"""Counts per chunk and per request, the figures that do not move with a shared machine's load.

`python -m bench overhead` measures CPU time, which a noisy neighbour moves by
10-20 %.  This counts what the time is made of, for olb and the other targets
in front of the raw mock (bench/rawmock.py), on one fixed load:

    syscalls   reads, writes, epoll waits of the proxy's processes, and its
               context switches (wake-ups), from the kernel's tracepoints
               (`perf stat -e syscalls:...`; needs perf and the permission to
               trace: root, or kernel.perf_event_paranoid <= -1)
    CPU        schedstat nanoseconds, as the overhead benchmark reads them
    callgrind  (--callgrind; the Python targets among --targets: olb, olb-obs,
               floor; olb and floor when there is none) user-space
               instructions, Python frames run (counted as calls of _PyFrame_Clear, which every
               frame goes through at its end)
               and allocations (PyObject_Malloc, PyObject_Calloc, malloc) in a
               window zeroed after the warm-up (valgrind, ~50x slower, so with
               --callgrind-requests of the load)

    python -m bench count                          # burst: 64 streams x 32 tokens, 8 a write burst
    python -m bench count --case version --requests 20000
    python -m bench count --callgrind --targets olb,floor
    python -m bench count --case generate --callgrind --targets olb,olb-obs   # what observation costs

Cases: burst (the overhead benchmark's burst case: 64 connections, 32-token
streams), stream (4 connections, 2,000-token streams), version (GET
/api/version on 32 connections) and generate (a small POST /api/generate with
"stream": false on 32 connections, the per-request target's shape).  An op is a
chunk (one NDJSON line) for the streams and a request for version and generate.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from . import load, overhead, proc, targets

CASES = {"burst": (64, 32), "stream": (4, 2000), "version": (32, 0), "generate": (32, 0)}
PER_REQUEST = ("version", "generate")
#: The targets --callgrind can count: the Python ones, run as a child process under valgrind.
CALLGRIND_KINDS = ("olb", "olb-obs", "floor")
TRACEPOINTS = {
    "read": ("syscalls:sys_enter_read", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_readv"),
    "write": ("syscalls:sys_enter_write", "syscalls:sys_enter_sendto", "syscalls:sys_enter_writev",
              "syscalls:sys_enter_sendmsg"),
    "epoll wait": ("syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait"),
    "epoll ctl": ("syscalls:sys_enter_epoll_ctl",),
    "wake-ups": ("context-switches",),
}
#: Callee names summed for the callgrind columns (CPython 3.11's names).
FRAMES = ("_PyFrame_Clear",)
ALLOCS = ("PyObject_Malloc", "PyObject_Calloc", "malloc", "calloc")


def _perf_events() -> list[str] | None:
    """The tracepoints this machine lets us count, or None (no perf, or not permitted)."""
    perf = shutil.which("perf")
    if perf is None:
        return None
    events = [e for group in TRACEPOINTS.values() for e in group]
    probe = subprocess.run([perf, "stat", "-x,", "-e", ",".join(events), "--", "true"],
                           capture_output=True, text=True)
    ok = [line.split(",")[2] for line in probe.stderr.splitlines()
          if line.count(",") >= 2 and "<not supported>" not in line and "<not counted>" not in line]
    ok = [e for e in events if e in ok]
    return ok or None


def _perf_read(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            parts = line.strip().split(",")
            if len(parts) >= 3 and parts[0].isdigit():
                out[parts[2]] = out.get(parts[2], 0) + int(parts[0])
    return out


def _callgrind_counts(path: str) -> dict[str, int]:
    """Total instructions, and calls to the FRAMES and ALLOCS functions, from a callgrind out file."""
    names: dict[str, str] = {}
    calls = {"frames": 0, "allocs": 0}
    total = 0
    callee = None
    name_re = re.compile(r"^c?fn=\((\d+)\)(?: (.*))?$")
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                m = name_re.match(line.rstrip("\n"))
                if m:
                    if m.group(2):
                        names[m.group(1)] = m.group(2)
                    callee = names.get(m.group(1)) if line.startswith("cfn=") else None
            elif line.startswith("calls=") and callee is not None:
                n = int(line[6:].split()[0])
                if callee in FRAMES:
                    calls["frames"] += n
                elif callee in ALLOCS:
                    calls["allocs"] += n
                callee = None
            elif line.startswith("summary:") or line.startswith("totals:"):
                total = max(total, int(line.split()[1]))
    return {"instructions": total, **calls}


async def _load(loop, addresses, case: str, conns: int = 0):
    """Keep-alive connections and their requests for `case` (`conns` of them, or the case's number)."""
    n = conns or CASES[case][0]
    reqs = overhead._requests(case if case in PER_REQUEST else "stream", addresses, n, tokens=CASES[case][1])
    return await load.open_conns(loop, addresses, n), reqs


async def measure(loop, args, spec: targets.TargetSpec, backends, events, tmp: str) -> dict:
    running = spec.start(backends, max(CASES[args.case][0], 64), tmp)
    await targets.wait_ready(running)
    try:
        conns, reqs = await _load(loop, running.addresses, args.case)
        try:
            await load.run_phase(loop, conns, reqs, max(len(conns), args.requests // 10), 30)
            pids = running.refresh_pids() if spec.kind != "direct" else []
            perf = None
            stat_path = os.path.join(tmp, f"{spec.name}.perf")
            if events and pids:
                perf = subprocess.Popen(["perf", "stat", "-x,", "-o", stat_path, "-e", ",".join(events),
                                         "-p", ",".join(map(str, pids))])
                await asyncio.sleep(0.3)  # perf attaches
            before = proc.CpuSample(pids) if pids else None
            phase = await load.run_phase(loop, conns, reqs, args.requests, args.seconds)
            after = proc.CpuSample(pids) if pids else None
            if perf is not None:
                perf.send_signal(2)
                perf.wait(10)
        finally:
            load.close_conns(conns)
        ops = phase.completed if args.case in PER_REQUEST else phase.lines
        row = {"target": spec.name, "requests": phase.completed, "chunks": phase.lines, "ops": ops,
               "errors": phase.errors}
        if before is not None and after is not None:
            delta = proc.cpu_delta(before, after)
            row["cpu_us_per_op"] = delta["cpu_s_schedstat"] / ops * 1e6
            # The kernel's share (utime/stime ticks): syscalls and loopback TCP, what every proxy pays.
            row["sys_share"] = delta["sys_s"] / delta["cpu_s"] if delta["cpu_s"] else 0.0
        if perf is not None and os.path.exists(stat_path):
            got = _perf_read(stat_path)
            row["syscalls"] = {k: sum(got.get(e, 0) for e in group) for k, group in TRACEPOINTS.items()
                               if any(e in got for e in group)}
        return row
    finally:
        running.stop()


async def callgrind(loop, args, kind: str, backends, tmp: str) -> dict:
    """One Python target under callgrind: counts in a window zeroed after the warm-up."""
    out = os.path.join(tmp, f"cg.{kind}")
    running = targets.TargetSpec(kind).start(backends, 64, tmp, wrap=(
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"))
    child = running.child
    assert child is not None  # olb and floor run as a child process (callgrind_control needs its pid)
    try:
        addresses = running.addresses
        conns, reqs = await _load(loop, addresses, args.case, 8 if args.case in PER_REQUEST else 16)
        try:
            await load.run_phase(loop, conns, reqs, len(conns) * 4, 120)
            subprocess.run(["callgrind_control", "-z", str(child.pid)], capture_output=True, check=False)
            phase = await load.run_phase(loop, conns, reqs, args.callgrind_requests, 600)
            subprocess.run(["callgrind_control", "-d", str(child.pid)], capture_output=True, check=False)
        finally:
            load.close_conns(conns)
    finally:
        running.stop()
    dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
    counts = _callgrind_counts(dumps[-1]) if dumps else {}
    ops = phase.completed if args.case in PER_REQUEST else phase.lines
    return {"target": kind, "requests": phase.completed, "ops": ops,
            **{f"{k}_per_op": v / ops for k, v in counts.items() if ops}}


async def run(args) -> dict:
    loop = asyncio.get_running_loop()
    mock = proc.Child([sys.executable, "-m", "bench.rawmock", "--count", "2", "--burst", str(args.burst)],
                      None, rb"^(http://\S+)", 2)
    backends = [proc.address(url) for url in mock.found]
    events = _perf_events()
    tmp = tempfile.mkdtemp(prefix="olb-count-")
    rows, cg = [], []
    try:
        for kind in args.targets:
            spec = targets.TargetSpec(kind)
            why = spec.missing()
            if why:
                print(f"SKIPPED: {why}")
                continue
            rows.append(await measure(loop, args, spec, backends, events, tmp))
            print(_fmt(rows[-1], args.case), flush=True)
        if args.callgrind:
            if shutil.which("valgrind") is None:
                print("SKIPPED: callgrind (valgrind is not installed: apt-get install -y valgrind)")
            else:
                # The Python targets asked for (olb, olb-obs, floor), else olb and the floor.
                kinds = [k for k in args.targets if k in CALLGRIND_KINDS] or ["olb", "floor"]
                for kind in kinds:
                    cg.append(await callgrind(loop, args, kind, backends, tmp))
                    c = cg[-1]
                    print(f"{kind:8} callgrind: {c.get('instructions_per_op', 0):9,.0f} instructions, "
                          f"{c.get('frames_per_op', 0):6.1f} Python frames, {c.get('allocs_per_op', 0):6.1f} "
                          f"allocations per {_unit(args.case)}", flush=True)
    finally:
        mock.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if events is None:
        print("syscall counts: none (perf is missing, or tracing is not permitted here)")
    return {"case": args.case, "rows": rows, "callgrind": cg}


def _unit(case: str) -> str:
    return "request" if case in PER_REQUEST else "chunk"


def _fmt(row: dict, case: str) -> str:
    unit = _unit(case)
    text = f"{row['target']:8} {row['ops']:9,} {unit}s"
    if "cpu_us_per_op" in row:
        text += f"  CPU {row['cpu_us_per_op']:6.2f} µs/{unit} ({row['sys_share']:.0%} kernel)"
    for name, n in row.get("syscalls", {}).items():
        text += f"  {name} {n / row['ops']:.3f}"
    if case not in PER_REQUEST and row["requests"]:
        text += f"  ({row['chunks'] / row['requests']:.0f} chunks a stream)"
    if row["errors"]:
        text += f"  ERRORS {row['errors']}"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench count", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), default="burst")
    p.add_argument("--targets", default="olb,floor,nginx,haproxy")
    p.add_argument("--requests", type=int, default=3000, help="measured requests (streams for burst/stream)")
    p.add_argument("--seconds", type=float, default=20.0, help="time bound of the measured phase")
    p.add_argument("--burst", type=int, default=8, help="the raw mock's tokens a write burst")
    p.add_argument("--callgrind", action="store_true", help="also count instructions, frames, allocations")
    p.add_argument("--callgrind-requests", type=int, default=300)
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in targets.KINDS or t == "direct"]
    if bad:
        p.error(f"unknown target(s): {', '.join(bad)}")
    if args.requests < 1 or args.callgrind_requests < 1:
        p.error("--requests and --callgrind-requests must be >= 1")
    print(f"# python -m bench count {' '.join(argv if argv is not None else sys.argv[1:])}; ops per "
          f"{_unit(args.case)}; figures per {_unit(args.case)}", flush=True)
    import uvloop

    t0 = time.monotonic()
    uvloop.run(run(args))
    print(f"# {time.monotonic() - t0:.0f} s")
    return 0
