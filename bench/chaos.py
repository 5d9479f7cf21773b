"""`python -m bench chaos`: olb under adversity, every request classified.

N clients send a mixed load (`/api/generate` and `/api/chat`, streamed and
not, 50/50 by default) through olb to simulated Ollama instances, each in a
process of its own (`python -m olb.sim`), while a scenario makes trouble:

    kill         (default) one backend is killed (SIGKILL) every 10-15 s and
                 restarted on its port 3 s later; with --kill-worker and
                 --workers 2 or more, one olb worker is killed too, halfway
    slow-heads   --adversaries (100) connections send a request head one byte a second
    slow-bodies  --adversaries (100) connections send a 1 MiB body one byte a second
    non-reading  --adversaries (6) clients ask for long streams and never read them
                 (olb with OLB_IDLE_TIMEOUT=3, backends at 2,000 tokens/s; olb pauses
                 a backend's read only once the kernel's socket buffers are full,
                 megabytes on loopback, which a short run may not reach)
    low-fd       olb runs under `ulimit -n --fd-limit` (soft and hard), fewer
                 descriptors than the load needs

A client pauses 0.1 s after a refused request or a clean error before its
next one. Every request of the load ends in one class:

    completed     the whole answer, cleanly framed, no error line
    clean_error   an error status with a whole JSON body, before any byte of an answer
    resumed       a stream with no error line that was continued elsewhere: more
                  token lines than its final line's eval_count (the backend that
                  finished it counted only its own)
    inband_error  200 already sent, then Ollama's {"error": ...} line and a clean end
    refused       the connection was closed or reset before any response byte (what a
                  server out of descriptors does at accept; a client may retry it)
    truncated     the connection ended after some of the response, before its end
    hung          no end within --hang seconds

Besides the classes: which backends olb marked down (its log), and how many
of those were not explained by a kill (a kill explains a mark of that
backend from the kill until 5 s after its restart): "healthy marked down",
which issue 14 wants at 0 in every scenario; how many streams olb ended for
a backend's silence (OLB_IDLE_TIMEOUT in its log: spurious outside the kill
scenario, since no simulated backend stalls); what olb still counts in flight
and queued once the load has stopped; olb's RSS (all its processes) every
second; for the slow-client scenarios, how many adversary connections olb
had closed by the end, and when.

Results: bench/results/chaos-SCENARIO.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import sys
import time

import h11
import orjson

from . import proc

SCENARIOS = ("kill", "slow-heads", "slow-bodies", "non-reading", "low-fd")
CLASSES = ("completed", "clean_error", "resumed", "inband_error", "refused", "truncated", "hung")
#: After a restart, a mark-down of that backend is still the kill's doing for this long (s).
KILL_GRACE = 5.0
MODELS = "llama3.2:latest"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=SCENARIOS, default="kill")
    p.add_argument("--clients", type=int, default=40, help="concurrent clients of the load")
    p.add_argument("--backends", type=int, default=3, help="simulated Ollama instances, one process each")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--kill-every", default="10,15", help="MIN,MAX seconds between backend kills (kill)")
    p.add_argument("--down", type=float, default=3.0, help="seconds a killed backend stays down")
    p.add_argument("--workers", type=int, default=1, help="OLB_WORKERS")
    p.add_argument("--kill-worker", action="store_true", help="also kill one olb worker halfway (kill)")
    p.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    p.add_argument("--tokens", default="20,200", help="MIN,MAX num_predict per request")
    p.add_argument("--token-rate", type=float, default=None,
                   help="tokens/s per request (olb-sim; default 50, non-reading 2000)")
    p.add_argument("--parallel", type=int, default=16, help="slots per backend (olb-sim and max=)")
    p.add_argument("--adversaries", type=int, default=None,
                   help="slow connections (default 100) or non-reading clients (default 6, issue 14's count: "
                        "each holds a slot for as long as it does not read)")
    p.add_argument("--fd-limit", type=int, default=64, help="olb's RLIMIT_NOFILE (low-fd)")
    p.add_argument("--hang", type=float, default=60.0, help="seconds after which a request counts as hung")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--olb-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an extra variable for olb (repeatable)")


def _pair(text: str, kind=float):
    lo, _, hi = text.partition(",")
    return kind(lo), kind(hi or lo)


# --- processes --------------------------------------------------------------------------------------


class Cluster:
    """The simulated backends (one process each, restartable on their port) and olb."""

    def __init__(self, args):
        self.args = args
        self.sims: list[proc.Child | None] = []
        self.urls: list[str] = []
        self.olb: proc.Child | None = None
        self.url = ""

    def sim_argv(self, port: int) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "olb.sim", "--host", "127.0.0.1", "--port", str(port), "--count", "1",
                "--token-rate", str(a.token_rate), "--ttft", "0.05", "--parallel", str(a.parallel),
                "--max-queue", "4096", "--models", MODELS,
                # Room for the non-reading clients' long streams (Ollama stops at the context).
                "--num-ctx", "131072" if a.scenario == "non-reading" else "4096"]

    def start(self) -> None:
        for _ in range(self.args.backends):
            child = proc.Child(self.sim_argv(0), None, rb"^(http://\S+)", 1)
            self.sims.append(child)
            self.urls.append(child.found[0])
        a = self.args
        env = {k: v for k, v in os.environ.items() if not k.startswith("OLB_")}
        env.update(OLB_LISTEN="127.0.0.1:0", OLB_WORKERS=str(a.workers),
                   OLB_BACKENDS=",".join(f"{u};max={a.parallel}" for u in self.urls))
        if a.scenario == "non-reading":
            # A pause must outlast the idle timeout within the run to show
            # whether olb takes it for the backend's silence.
            env["OLB_IDLE_TIMEOUT"] = "3"
        for item in a.olb_env:
            name, _, value = item.partition("=")
            env[name] = value
        argv = [sys.executable, "-m", "olb"]
        if a.scenario == "low-fd":
            # Soft and hard: olb raises its soft limit to the hard one at start-up.
            argv = ["sh", "-c", f'ulimit -n {a.fd_limit} && exec "$@"', "sh", *argv]
        self.olb = proc.Child(argv, env, rb"listening on (http://\S+)", 1)
        self.url = self.olb.found[0]

    def kill_backend(self, i: int) -> None:
        child, self.sims[i] = self.sims[i], None
        if child is not None:
            child.stop(signal.SIGKILL)

    def restart_backend(self, i: int) -> None:
        port = int(self.urls[i].rsplit(":", 1)[1])
        deadline = time.monotonic() + 10
        while True:  # the port may linger a moment after the kill
            try:
                self.sims[i] = proc.Child(self.sim_argv(port), None, rb"^(http://\S+)", 1)
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def olb_pids(self) -> list[int]:
        return proc.process_tree(self.olb.pid) if self.olb and self.olb.alive() else []

    def stop(self) -> None:
        if self.olb is not None:  # None when olb did not start
            self.olb.stop()
        for child in self.sims:
            if child is not None:
                child.stop()


# --- one request of the load ------------------------------------------------------------------------


def _request(rng: random.Random, args, n: int) -> tuple[str, bytes, bool]:
    stream = rng.random() < args.stream_share
    lo, hi = _pair(args.tokens, int)
    options = {"num_predict": rng.randint(lo, hi)}
    if rng.random() < 0.5:
        path = "/api/chat"
        body = {"model": "llama3.2", "messages": [{"role": "user", "content": f"request {n}"}],
                "stream": stream, "options": options}
    else:
        path = "/api/generate"
        body = {"model": "llama3.2", "prompt": f"request {n}", "stream": stream, "options": options}
    return path, orjson.dumps(body), stream


def classify(status: int | None, body: bytes, ended: bool, stream: bool) -> str:
    """One request's class (see the module doc) from what the client got."""
    if not ended:
        return "refused" if status is None and not body else "truncated"
    if status != 200:
        try:
            return "clean_error" if "error" in orjson.loads(body) else "truncated"
        except (orjson.JSONDecodeError, TypeError):
            return "truncated"
    try:
        lines = [orjson.loads(line) for line in body.splitlines() if line.strip()]
    except orjson.JSONDecodeError:
        return "truncated"
    if not lines:
        return "truncated"
    if any("error" in line for line in lines):
        return "inband_error"
    last = lines[-1]
    if not last.get("done"):
        return "truncated"
    if stream and last.get("eval_count") is not None and len(lines) - 1 > last["eval_count"]:
        return "resumed"
    return "completed"


async def one(host: str, port: int, path: str, body: bytes, stream: bool, hang: float) -> str:
    conn = h11.Connection(h11.CLIENT)
    status = None
    data = bytearray()
    ended = False
    writer = None
    got = 0  # response bytes read

    async def exchange():
        nonlocal status, ended, writer, got
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(conn.send(h11.Request(method="POST", target=path, headers=[
            ("host", host), ("content-type", "application/json"), ("content-length", str(len(body))),
            ("connection", "close")])) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(65536)
                got += len(chunk)
                conn.receive_data(chunk)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data.extend(event.data)
            elif isinstance(event, h11.EndOfMessage):
                ended = True
                return
            elif isinstance(event, h11.ConnectionClosed):
                return

    try:
        await asyncio.wait_for(exchange(), hang)
    except asyncio.TimeoutError:
        return "hung"
    except (OSError, h11.RemoteProtocolError):
        pass
    finally:
        if writer is not None:
            writer.close()
    if not ended and got:
        return "truncated"  # some bytes came, not even a whole head among them
    return classify(status, bytes(data), ended, stream)


# --- the run ----------------------------------------------------------------------------------------


async def _get_json(host: str, port: int, path: str) -> dict | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
        return orjson.loads(raw.split(b"\r\n\r\n", 1)[1])
    except (OSError, asyncio.TimeoutError, orjson.JSONDecodeError, IndexError):
        return None
    finally:
        writer.close()


async def _adversary(kind: str, host: str, port: int, stop: asyncio.Event, closed: list, t0: float) -> None:
    """One slow or non-reading connection; appends when olb closed it (s since start), if it did."""
    try:
        sock = socket.socket()
        if kind == "non-reading":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except OSError:
        return
    try:
        if kind == "non-reading":
            body = orjson.dumps({"model": "llama3.2", "prompt": "long",
                                 "options": {"num_predict": 1000000, "num_ctx": 131072}})
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s"
                         % (host.encode(), len(body), body))
            await stop.wait()
            return
        if kind == "slow-heads":
            drip = b"POST /api/generate HTTP/1.1\r\nHost: " + host.encode() + b"\r\n" + b"X-Slow: y\r\n" * 10000
        else:
            writer.write(b"POST /api/generate HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1048576\r\n\r\n" % host.encode())
            drip = b"{" + b" " * 1048575
        eof = asyncio.ensure_future(reader.read())
        for byte in drip:
            writer.write(bytes((byte,)))
            done, _ = await asyncio.wait([eof], timeout=1.0)
            if done or stop.is_set():
                break
        if eof.done():
            closed.append(time.monotonic() - t0)
        else:
            eof.cancel()
    except OSError:
        closed.append(time.monotonic() - t0)
    finally:
        writer.close()


def _marks(log: str) -> list[tuple[float, str, str]]:
    """(wall time, backend URL, reason) of every 'marked down' line in olb's log."""
    out = []
    for m in re.finditer(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) \S+ \S+ backend (\S+) marked down: (.*)$",
                         log, re.M):
        wall = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
        out.append((wall, m.group(3), m.group(4)))
    return out


async def run(args) -> dict:
    rng = random.Random(args.seed)
    cluster = Cluster(args)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, cluster.start)
    hostport = cluster.url.split("//", 1)[1]
    host, port = hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1])
    counts = dict.fromkeys(CLASSES, 0)
    # By endpoint and kind: issue 14's resume target is about chat streams.
    by_kind = {f"{path} {kind}": dict.fromkeys(CLASSES, 0)
               for path in ("/api/chat", "/api/generate") for kind in ("stream", "whole")}
    events: list[dict] = []
    rss: list[tuple[float, int]] = []
    kills: list[tuple[str, float, float]] = []  # (url, killed at, restarted at): wall clock
    t0 = time.monotonic()
    end = t0 + args.duration
    stop = asyncio.Event()
    seq = 0

    async def client(i: int) -> None:
        nonlocal seq
        crng = random.Random(args.seed * 1000 + i)
        while time.monotonic() < end:
            seq += 1
            path, body, stream = _request(crng, args, seq)
            cls = await one(host, port, path, body, stream, args.hang)
            counts[cls] += 1
            by_kind[f"{path} {'stream' if stream else 'whole'}"][cls] += 1
            if cls in ("refused", "clean_error"):
                await asyncio.sleep(0.1)  # a client backs off a little before it tries again

    async def killer() -> None:
        lo, hi = _pair(args.kill_every)
        worker_done = not (args.kill_worker and args.workers > 1)
        while True:
            delay = rng.uniform(lo, hi)
            if time.monotonic() + delay >= end:
                return
            await asyncio.sleep(delay)
            i = rng.randrange(args.backends)
            url = cluster.urls[i]
            killed = time.time()
            await loop.run_in_executor(None, cluster.kill_backend, i)
            events.append({"t": round(time.monotonic() - t0, 2), "event": f"killed backend {url}"})
            if not worker_done and time.monotonic() - t0 >= args.duration / 2:
                workers = cluster.olb_pids()[1:]
                if workers:
                    os.kill(workers[0], signal.SIGKILL)
                    events.append({"t": round(time.monotonic() - t0, 2), "event": f"killed olb worker {workers[0]}"})
                worker_done = True
            await asyncio.sleep(args.down)
            await loop.run_in_executor(None, cluster.restart_backend, i)
            kills.append((url, killed, time.time()))
            events.append({"t": round(time.monotonic() - t0, 2), "event": f"restarted backend {url}"})

    async def sampler() -> None:
        while not stop.is_set():
            mem = proc.memory(cluster.olb_pids())
            rss.append((round(time.monotonic() - t0, 1), mem["rss_kib"]))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    closed: list[float] = []
    adversaries = []
    if args.scenario in ("slow-heads", "slow-bodies", "non-reading"):
        adversaries = [asyncio.ensure_future(_adversary(args.scenario, host, port, stop, closed, t0))
                       for _ in range(args.adversaries)]
    background = [asyncio.ensure_future(sampler())]
    kill_task = asyncio.ensure_future(killer()) if args.scenario == "kill" else None
    try:
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        if kill_task is not None:
            await kill_task
        load_s = time.monotonic() - t0
        stop.set()
        await asyncio.gather(*adversaries)
        # What olb still counts once every client has its answer and the
        # adversaries are gone (a few seconds for closes to be seen).
        settle_end = time.monotonic() + 10
        status = None
        while time.monotonic() < settle_end:
            status = await _get_json(host, port, "/olb/status")
            if status and not status.get("queue") and not any(b["inflight"] for b in status["backends"]):
                break
            await asyncio.sleep(0.5)
        await asyncio.gather(*background)
    finally:
        stop.set()
        await loop.run_in_executor(None, cluster.stop)
    log = cluster.olb.stderr_tail(limit=10**9) if cluster.olb is not None else ""
    marks = _marks(log)
    unexplained = [m for m in marks if not any(m[1] == url and killed <= m[0] <= back + KILL_GRACE
                                               for url, killed, back in kills)]
    total = sum(counts.values())
    rss_values = [v for _, v in rss]
    return {
        "benchmark": "chaos",
        "scenario": args.scenario,
        "requests": total,
        "classes": counts,
        "by_kind": by_kind,
        "load_s": round(load_s, 1),
        "events": events,
        "marked_down": [{"backend": url, "reason": reason} for _, url, reason in marks],
        "healthy_marked_down": [{"backend": url, "reason": reason} for _, url, reason in unexplained],
        # Streams olb ended for a backend's silence (its log): none of the
        # simulated backends ever stalls, so outside the kill scenario each is spurious.
        "idle_timeouts": log.count("(OLB_IDLE_TIMEOUT)"),
        "after_load": None if status is None else {
            "inflight": [b["inflight"] for b in status["backends"]],
            "queue": status.get("queue"),
            "healthy": [b["healthy"] for b in status["backends"]],
            "last_error": [b["last_error"] for b in status["backends"]],
        },
        "rss_kib": {"start": rss_values[0] if rss_values else None, "peak": max(rss_values, default=None),
                    "end": rss_values[-1] if rss_values else None, "series": rss},
        "adversaries": None if not adversaries else {
            "count": args.adversaries, "closed_by_olb": len(closed),
            "closed_after_s_median": round(statistics.median(closed), 1) if closed else None,
        },
    }


def markdown(result: dict, command: str) -> str:
    c = result["classes"]
    lines = [f"# chaos: {result['scenario']}", "", f"`{command}`", "",
             "| " + " | ".join(CLASSES) + " | requests |", "|" + "---:|" * (len(CLASSES) + 1)]
    lines.append("| " + " | ".join(str(c[k]) for k in CLASSES) + f" | {result['requests']} |")
    for kind, row in result["by_kind"].items():
        lines.append("| " + " | ".join(str(row[k]) for k in CLASSES) + f" | {kind} |")
    rss = result["rss_kib"]
    after = result["after_load"] or {}
    lines += ["",
              f"- backends marked down: {len(result['marked_down'])}, of them healthy (no kill explains it): "
              f"{len(result['healthy_marked_down'])}",
              f"- streams ended for a backend's silence (OLB_IDLE_TIMEOUT): {result['idle_timeouts']}",
              f"- after the load: in flight {after.get('inflight')}, queued {after.get('queue')}, "
              f"healthy {after.get('healthy')}",
              f"- olb RSS (KiB): start {rss['start']}, peak {rss['peak']}, end {rss['end']}"]
    if result["adversaries"]:
        adv = result["adversaries"]
        lines.append(f"- adversary connections: {adv['count']}, closed by olb: {adv['closed_by_olb']} "
                     f"(median after {adv['closed_after_s_median']} s)")
    for m in result["healthy_marked_down"][:10]:
        lines.append(f"  - healthy marked down: {m['backend']}: {m['reason']}")
    if result["events"]:
        lines += ["", "events: " + "; ".join(f"{e['t']} s {e['event']}" for e in result["events"])]
    return "\n".join(lines) + "\n"


def main(argv, out: str) -> int:
    import shlex

    import uvloop

    p = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--out", default=out, help="directory for chaos-SCENARIO.json and .md")
    args = p.parse_args(argv)
    if args.adversaries is None:
        args.adversaries = 6 if args.scenario == "non-reading" else 100
    if args.token_rate is None:
        # A stream not read fills the kernel's socket buffers (megabytes on
        # loopback) before olb pauses its backend: it needs bytes quickly.
        args.token_rate = 2000.0 if args.scenario == "non-reading" else 50.0
    # The load's client sockets are this process's descriptors.
    proc.raise_fd_limit(4 * (args.clients + args.adversaries) + 256)
    command = "python -m bench chaos " + shlex.join(argv)
    print(f"# {command}", flush=True)
    result = uvloop.run(run(args))
    result.update(command=command, machine=proc.machine(), date=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                  args=vars(args))
    os.makedirs(args.out, exist_ok=True)
    name = os.path.join(args.out, f"chaos-{args.scenario}")
    with open(name + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result, command)
    with open(name + ".md", "w") as f:
        f.write(md)
    print("\n" + md + f"\nresults: {name}.json, .md")
    return 0
