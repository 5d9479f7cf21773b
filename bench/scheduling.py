"""Scheduling: olb's scheduler against nginx and HAProxy on a simulated LLM cluster.

    python -m bench.scheduling                      # ~5 min on 2 cores
    python -m bench.scheduling --quick              # a smoke run (~1 min)
    python -m bench.scheduling --targets olb,nginx-lc --loads 0.8 --duration 60

The cluster: four simulated Ollama instances (olb.sim with a simulated GPU),
two fast (H100, 80 GiB) and two slow (RTX 3090 speeds, 12 GiB), in ONE child
process, each started fresh for every (target, mix, load) so that every
target begins from the same cold GPUs.  Everything runs `--time-scale` times
faster than real time; every time reported here is in SIMULATED seconds
(measured real time x time scale), so a 5 ms stall of this 2-core machine
shows as 5 ms x scale.

The workload (fixed seed, the same request list for every target):

* Six chat models with Zipf(s=1) popularity; the ranking rotates by one
  model at each third of the run (drift).
* Multi-turn sessions: sessions start as a Poisson process; each has a
  geometric number of turns (mean 4); turn k+1 is sent a think time
  (exponential) after the planned time of turn k, or right after turn k's
  reply if that came later.  Every request carries the whole conversation:
  the model's system prompt (~750 tokens, shared by all its sessions), the
  earlier user turns and the replies as received, so a backend that served
  the earlier turn holds most of the prompt in its prefix cache.
* Output lengths (`num_predict`): lognormal, median 48, capped at 1,024.
* Offered load as a fraction of an estimated capacity: per GPU and model,
  one request costs prefill (whole prompt, no cache) + decode at a full batch
  of `--parallel` (r1/(1+0.15(B-1)) per sequence); a GPU's capacity is the
  inverse of the popularity-weighted mean cost; the cluster's is the sum.
  Model loads are not counted, so 100 % is out of reach without affinity.
* The control mix: one model (llama3.1:8b), one-turn sessions with unique
  prompts, no shared prefix: nothing for a model- or cache-aware scheduler
  to win; olb should be within 5 % of least_conn there.

Targets: `olb` (its full scheduler: model awareness from /api/ps, session
affinity, DCGM utilisation from the sims' /metrics), `olb-lif` (olb with
OLB_MODELS_INTERVAL=0 OLB_SESSION_BOUND=0 and no metrics: plain
least-in-flight), `nginx-lc` (least_conn), `nginx-rr` (round-robin) and
`haproxy-lc` (leastconn), as configured by bench/targets.py.

Reported per target, mix and load, over the requests issued after the
warm-up: TTFT p50/p99 (to the first streamed NDJSON line), end-to-end p99,
throughput (eval tokens of completed requests / simulated time from the
first request to the last completion), goodput (completed requests with
TTFT <= --slo-ttft, per simulated second), the 503 and other-error shares
(requests still open at the end of the drain count as errors), and over the
whole run: model loads and simulated GPU-seconds spent loading, the prompt
cache hit rate (cached / total prompt tokens, from the sims' engines), the
share of time each GPU was busy, and the proxy's CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import time

from .proc import Child, CpuSample, cpu_delta, find_exe, machine
from .targets import (Running, TargetSpec, _listening_socket, _private_dir, nginx_conf,
                      wait_ready)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

TARGETS = ("olb", "olb-lif", "nginx-lc", "nginx-rr", "haproxy-lc")
#: The chat models of the mix; the last two are stand-ins (specs derived from llama3.1:8b).
MODELS = ("llama3.1:8b", "qwen2.5:7b", "mistral:latest", "llama3.2:latest", "gemma2:9b", "phi3:14b")
CONTROL_MODEL = "llama3.1:8b"
#: (name, GPU profile, VRAM GiB or None for the profile's)
CLUSTER = (("fast-0", "h100", None), ("fast-1", "h100", None),
           ("slow-0", "rtx3090", 12), ("slow-1", "rtx3090", 12))
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no what up out them some could into more time only other then these two may first "
         "any new very like our over such after most make even well back through where much "
         "before must right same down should because each those people about how just").split()


# --- the simulated cluster (a child process) ------------------------------------------------------


def _extra_specs() -> dict:
    from olb.sim.catalogue import KNOWN_MODELS

    base = KNOWN_MODELS["llama3.1:8b"]
    return {
        "gemma2:9b": dataclasses.replace(base, name="gemma2:9b", parameter_size="9.2B",
                                         parameter_count=9241705984, size=5443152417),
        "phi3:14b": dataclasses.replace(base, name="phi3:14b", parameter_size="14.0B",
                                        parameter_count=13960238080, size=7898828608),
    }


def _model_spec(name: str):
    from olb.sim.catalogue import KNOWN_MODELS

    return KNOWN_MODELS.get(name) or _extra_specs()[name]


def _profile(gpu: str, vram_gib):
    from olb.sim.gpu import PROFILES

    p = PROFILES[gpu]
    return p.replace(vram=int(vram_gib * 2**30)) if vram_gib else p


def _install_counters() -> None:
    """Counters the engine does not keep, added in the sims' process only (olb/ is not changed):
    simulated seconds of model loading, prompt tokens and cached prompt tokens, GPU busy seconds."""
    from olb.sim import engine as eng
    from olb.sim import gpu as gpumod

    load = eng.Engine._load

    def _load(self, p):
        self.bench_load_s = getattr(self, "bench_load_s", 0.0) + self.gpu.profile.load_seconds(p.model.spec)
        by = self.__dict__.setdefault("bench_loads_by_model", {})
        by[p.model.spec.name] = by.get(p.model.spec.name, 0) + 1
        load(self, p)

    granted = eng.Generation.granted

    def _granted(self):
        was = self._state
        granted(self)
        if was == "queued" and self.engine.gpu is not None:
            e = self.engine
            e.bench_prompt = getattr(e, "bench_prompt", 0) + self.prompt_tokens
            e.bench_cached = getattr(e, "bench_cached", 0) + self.cached

    mark = gpumod.Gpu._mark

    def _mark(self):
        start = self._busy_since
        mark(self)
        if start is not None and self._busy_since is None and self._busy:
            s, e = self._busy[-1]
            self.bench_busy = getattr(self, "bench_busy", 0.0) + (e - s)

    eng.Engine._load = _load
    eng.Generation.granted = _granted
    gpumod.Gpu._mark = _mark


async def _serve_sims(spec: dict) -> None:
    from olb.sim import SimConfig, start_sim

    _install_counters()
    models = [m if m in MODELS[:4] else _extra_specs()[m] for m in spec["models"]]
    servers = []
    for i, (name, gpu, vram) in enumerate(spec["cluster"]):
        cfg = SimConfig(gpu=_profile(gpu, vram), num_parallel=spec["parallel"], models=tuple(models),
                        time_scale=spec["time_scale"], seed=spec["seed"] + i)
        servers.append(await start_sim(cfg))
    starts = [s.engine.gpu.now() for s in servers]
    for s in servers:
        print(f"sim {s.url}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    out = []
    for (name, gpu, vram), s, t0 in zip(spec["cluster"], servers, starts):
        e, g = s.engine, s.engine.gpu
        busy = getattr(g, "bench_busy", 0.0)
        if g._busy_since is not None:
            busy += g.now() - g._busy_since
        out.append({"name": name, "gpu": gpu, "loads": e.loads, "unloads": e.unloads,
                    "evictions": e.evictions, "load_s": getattr(e, "bench_load_s", 0.0),
                    "loads_by_model": getattr(e, "bench_loads_by_model", {}),
                    "prompt_tokens": getattr(e, "bench_prompt", 0),
                    "cached_tokens": getattr(e, "bench_cached", 0),
                    "busy_s": busy, "span_s": g.now() - t0})
    for s in servers:
        await s.close()
    with open(spec["dump"], "w") as f:
        json.dump(out, f)


class Sims:
    """The four instances in a child process; `stop()` returns their counters."""

    def __init__(self, args, models: tuple, tmp: str):
        self.dump = os.path.join(tmp, f"sims-{time.monotonic_ns()}.json")
        spec = {"cluster": CLUSTER, "models": list(models), "parallel": args.parallel,
                "time_scale": args.time_scale, "seed": args.seed, "dump": self.dump}
        self.child = Child([sys.executable, "-m", "bench.scheduling", "--serve-sims", json.dumps(spec)],
                           dict(os.environ), rb"^sim (\S+)", len(CLUSTER))
        self.urls = self.child.found

    def stop(self) -> list:
        self.child.stop()
        try:
            with open(self.dump) as f:
                return json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"the sims left no counters:\n{self.child.stderr_tail()}") from None


# --- targets --------------------------------------------------------------------------------------


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


def start_target(name: str, urls: list[str], args, tmp: str) -> Running:
    backends = [_hostport(u) for u in urls]
    if name in ("olb", "olb-lif"):
        full = name == "olb"
        spec = ",".join(f"{u};max={args.olb_max}" + (f";metrics={u}/metrics" if full else "")
                        for u in urls)
        env = dict(os.environ, OLB_BACKENDS=spec, OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="1",
                   OLB_HEALTH_INTERVAL="1", OLB_LOG_LEVEL="warning",
                   OLB_GPU_POLL="0.5" if full else "0",
                   OLB_MODELS_INTERVAL="1" if full else "0",
                   OLB_SESSION_BOUND="1.25" if full else "0")
        child = Child([sys.executable, "-m", "olb"], env, rb"listening on http://(\S+)", 1)
        host, port = child.found[0].rsplit(":", 1)
        return Running(name, "olb", 1, [(host, int(port))], child=child)
    if name == "nginx-lc":
        return TargetSpec("nginx").start(backends, 512, tmp)
    if name == "haproxy-lc":
        return TargetSpec("haproxy").start(backends, 512, tmp)
    if name == "nginx-rr":
        # bench/targets.py writes least_conn; the same configuration without it is round-robin.
        prefix = _private_dir(tmp, name)
        sock = _listening_socket(4096)
        port = sock.getsockname()[1]
        conf = os.path.join(prefix, "nginx.conf")
        text = nginx_conf(prefix, port, backends, 1, 512)
        assert "        least_conn;\n" in text
        with open(conf, "w") as f:
            f.write(text.replace("        least_conn;\n", ""))
        fd = sock.fileno()
        child = Child([find_exe("nginx"), "-p", prefix + "/", "-e", os.path.join(prefix, "error.log"),
                       "-c", conf, "-g", "daemon off;"], dict(os.environ, NGINX=f"{fd};"), pass_fds=(fd,))
        return Running(name, "nginx", 1, [("127.0.0.1", port)], child=child, tmpdir=prefix, sock=sock)
    raise ValueError(name)


def missing(name: str) -> str | None:
    exe = {"nginx-lc": "nginx", "nginx-rr": "nginx", "haproxy-lc": "haproxy"}.get(name)
    if exe and find_exe(exe) is None:
        return f"{exe} is not installed (apt-get install -y {exe}); {name} skipped"
    return None


# --- the workload ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Session:
    start: float                 # simulated seconds from the start of the run
    model: str
    system: str | None
    turns: list                  # [(planned offset from start, user text, num_predict)]


def _text(rng: random.Random, chars: int) -> str:
    out, n = [], 0
    while n < chars:
        w = rng.choice(WORDS)
        out.append(w)
        n += len(w) + 1
    return " ".join(out)


def _num_predict(rng: random.Random) -> int:
    return max(1, min(1024, int(rng.lognormvariate(math.log(48), 1.0))))


def _popularity(t: float, duration: float, s: float = 1.0) -> list[float]:
    """Zipf weights of MODELS at simulated time t: the ranking rotates by one at each third."""
    epoch = min(2, int(3 * t / duration)) if duration > 0 else 0
    n = len(MODELS)
    w = [0.0] * n
    for rank in range(n):
        w[(rank + epoch) % n] = 1.0 / (rank + 1) ** s
    return w


def make_sessions(mix: str, rate_req: float, duration: float, seed: int) -> list[Session]:
    """Sessions for `duration` simulated seconds at `rate_req` requests per simulated second."""
    rng = random.Random(f"{seed}:{mix}")
    systems = {m: f"You are assistant {m}. " + _text(random.Random(f"{seed}:sys:{m}"), 3000)
               for m in MODELS}
    mean_turns = 4.0 if mix == "llm" else 1.0
    rate_sessions = rate_req / mean_turns
    sessions, t = [], 0.0
    while True:
        t += rng.expovariate(rate_sessions)
        if t >= duration:
            return sessions
        if mix == "llm":
            model = rng.choices(MODELS, _popularity(t, duration))[0]
            turns, at = [], 0.0
            while True:
                turns.append((at, _text(rng, 600 if not turns else rng.randint(200, 600)),
                              _num_predict(rng)))
                if rng.random() < 1 / mean_turns:
                    break
                at += rng.expovariate(1 / 8.0)
            sessions.append(Session(t, model, systems[model], turns))
        else:
            sessions.append(Session(t, CONTROL_MODEL, None,
                                    [(0.0, f"{len(sessions)} " + _text(rng, 3600), _num_predict(rng))]))


def capacity(mix: str, sessions: list[Session], parallel: int, duration: float) -> dict:
    """Requests per simulated second the cluster serves with a full batch, no cache and no loads."""
    n_req = sum(len(s.turns) for s in sessions) or 1
    out_mean = sum(np for s in sessions for _, _, np in s.turns) / n_req
    prompt_chars = 0
    for s in sessions:
        chars = len(s.system or "")
        for _, text, np in s.turns:
            chars += len(text)
            prompt_chars += chars
            chars += 4 * np          # the reply, ~4 characters per token
    prompt_mean = prompt_chars / 4 / n_req
    if mix == "llm":
        steps = 60
        w = [0.0] * len(MODELS)
        for i in range(steps):
            for k, x in enumerate(_popularity((i + 0.5) * duration / steps, duration)):
                w[k] += x
        models = MODELS
    else:
        w, models = [1.0], (CONTROL_MODEL,)
    total = sum(w)
    per_gpu = []
    for _name, gpu, vram in CLUSTER:
        p = _profile(gpu, vram)
        cost = 0.0
        for m, wk in zip(models, w):
            spec = _model_spec(m)
            decode = out_mean * (1 + p.alpha * (parallel - 1)) / (p.eval_rate(spec) * parallel)
            cost += wk / total * (prompt_mean / p.prompt_rate(spec) + decode)
        per_gpu.append(1 / cost)
    return {"req_per_s": sum(per_gpu), "per_gpu": per_gpu, "out_mean": out_mean,
            "prompt_mean_tokens": prompt_mean}


# --- the client -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    issued: float                # simulated seconds from the start of the run
    status: int = 0
    ttft: float | None = None    # simulated seconds
    e2e: float | None = None
    tokens: int = 0
    error: str = ""
    done_at: float | None = None


async def chat(host: str, port: int, body: bytes, scale: float, t0: float, res: Result) -> str:
    """One streamed /api/chat over a fresh connection; fills `res`; returns the reply text."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (host.encode(), port, len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        res.status = int(head.split(b" ", 2)[1])
        if res.status != 200:
            res.error = f"http {res.status}"
            return ""
        chunked = b"transfer-encoding: chunked" in head.lower()
        raw, body_buf, parts = b"", b"", []
        while True:
            data = await reader.read(65536)
            if not data:
                res.error = "connection closed early"
                return ""
            if chunked:
                raw += data
                while True:
                    i = raw.find(b"\r\n")
                    if i < 0:
                        break
                    size = int(raw[:i].split(b";")[0], 16)
                    if len(raw) < i + 2 + size + 2:
                        break
                    body_buf += raw[i + 2:i + 2 + size]
                    raw = raw[i + 4 + size:]
            else:
                body_buf += data
            *lines, body_buf = body_buf.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                now = time.perf_counter()
                if res.ttft is None:
                    res.ttft = (now - start) * scale
                obj = json.loads(line)
                if "error" in obj:
                    res.error = "in-band error"
                    return ""
                parts.append(obj.get("message", {}).get("content", ""))
                if obj.get("done"):
                    res.e2e = (now - start) * scale
                    res.done_at = (now - t0) * scale
                    res.tokens = obj.get("eval_count", 0)
                    return "".join(parts)
    finally:
        writer.close()


async def drive(addr: tuple[str, int], sessions: list[Session], args, model_opts: dict) -> list[Result]:
    host, port = addr
    scale = args.time_scale
    results: list[Result] = []
    t0 = time.perf_counter()
    stop_issuing = args.duration          # simulated; no new turn after it

    def sim_now() -> float:
        return (time.perf_counter() - t0) * scale

    async def run_session(s: Session) -> None:
        messages = [{"role": "system", "content": s.system}] if s.system else []
        last_done = 0.0
        for at, text, np in s.turns:
            when = max(s.start + at, last_done)
            if when >= stop_issuing:
                return
            delay = when - sim_now()
            if delay > 0:
                await asyncio.sleep(delay / scale)
            messages.append({"role": "user", "content": text})
            body = json.dumps({"model": s.model, "messages": messages, "stream": True,
                               "options": {"num_predict": np, **model_opts}}).encode()
            res = Result(issued=sim_now())
            results.append(res)
            try:
                reply = await chat(host, port, body, scale, t0, res)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                res.error = f"{type(exc).__name__}"
                return
            if res.error:
                return
            messages.append({"role": "assistant", "content": reply})
            last_done = sim_now() + 0.5

    tasks = [asyncio.ensure_future(run_session(s)) for s in sessions]
    deadline = t0 + (args.duration + args.drain) / scale
    pending = set(tasks)
    while pending and time.perf_counter() < deadline:
        _done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.perf_counter()))
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for r in results:
        if r.e2e is None and not r.error:
            r.error = "unfinished at the end of the drain"
    return results


# --- one configuration ----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def summarise(results: list[Result], sims: list, cpu: dict, args) -> dict:
    measured = [r for r in results if r.issued >= args.warmup]
    ok = [r for r in measured if r.e2e is not None]
    n = len(measured) or 1
    ttft = [r.ttft for r in measured if r.ttft is not None and not r.error]
    first = min((r.issued for r in measured), default=0.0)
    last = max((r.done_at for r in ok), default=first)
    span = max(1e-9, last - first)
    good = [r for r in ok if r.ttft <= args.slo_ttft]
    prompt = sum(s["prompt_tokens"] for s in sims)
    return {
        "requests": len(measured), "completed": len(ok),
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
        "e2e_p99": _pct([r.e2e for r in ok], 99),
        "tokens_per_s": sum(r.tokens for r in ok) / span,
        "goodput_req_s": len(good) / span, "goodput_share": len(good) / n,
        "rate_503": sum(r.status == 503 for r in measured) / n,
        "rate_other_errors": sum(bool(r.error) and r.status != 503 for r in measured) / n,
        "errors": _count(r.error for r in measured if r.error),
        "loads": sum(s["loads"] for s in sims), "evictions": sum(s["evictions"] for s in sims),
        "load_gpu_s": sum(s["load_s"] for s in sims),
        "cache_hit": (sum(s["cached_tokens"] for s in sims) / prompt) if prompt else None,
        "gpu_busy": {s["name"]: s["busy_s"] / s["span_s"] if s["span_s"] else None for s in sims},
        "proxy_cpu_s": cpu.get("cpu_s_schedstat"), "sims": sims,
    }


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


async def run_one(target: str, mix: str, load: float, args, tmp: str) -> dict:
    models = MODELS if mix == "llm" else (CONTROL_MODEL,)
    probe = make_sessions(mix, 1.0, args.duration, args.seed)
    cap = capacity(mix, probe, args.parallel, args.duration)
    sessions = make_sessions(mix, load * cap["req_per_s"], args.duration, args.seed)
    sims = Sims(args, models, tmp)
    running = None
    try:
        running = start_target(target, sims.urls, args, tmp)
        await wait_ready(running)
        pids = running.refresh_pids()
        before = CpuSample(pids)
        results = await drive(running.addresses[0], sessions, args, {})
        cpu = cpu_delta(before, CpuSample(pids))
    finally:
        if running is not None:
            running.stop()
        counters = sims.stop()
    row = summarise(results, counters, cpu, args)
    row.update(target=target, mix=mix, load=load, capacity_req_s=cap["req_per_s"],
               offered_req_s=load * cap["req_per_s"])
    return row


# --- output ---------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def table(rows: list[dict]) -> str:
    head = ("| mix | load | target | req | TTFT p50 s | TTFT p99 s | E2E p99 s | tok/s | goodput | "
            "503 | other err | loads | load GPU-s | cache hit | GPU busy f0/f1/s0/s1 | proxy CPU s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        busy = "/".join(_f(v, "{:.0%}") for v in r["gpu_busy"].values())
        lines.append(
            f"| {r['mix']} | {r['load']:.0%} | {r['target']} | {r['requests']} | {_f(r['ttft_p50'])} | "
            f"{_f(r['ttft_p99'])} | {_f(r['e2e_p99'])} | {r['tokens_per_s']:.0f} | "
            f"{r['goodput_share']:.0%} | {r['rate_503']:.1%} | {r['rate_other_errors']:.1%} | "
            f"{r['loads']} | {r['load_gpu_s']:.0f} | {_f(r['cache_hit'], '{:.0%}')} | {busy} | "
            f"{_f(r['proxy_cpu_s'])} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    """The issue's targets at the loads in 70-90 %, and the control mix's 5 %."""
    out = []
    by = {(r["mix"], r["load"], r["target"]): r for r in rows}
    for (mix, load, target), r in sorted(by.items()):
        if target != "olb":
            continue
        lc, rr = by.get((mix, load, "nginx-lc")), by.get((mix, load, "nginx-rr"))
        if mix == "llm" and 0.7 <= load <= 0.9 and lc:
            checks = [("p99 TTFT <= 1/2 nginx least_conn", r["ttft_p99"], lc["ttft_p99"], 0.5, "le"),
                      ("model loads <= 1/5 nginx least_conn", r["loads"], lc["loads"], 0.2, "le"),
                      ("throughput >= nginx least_conn", r["tokens_per_s"], lc["tokens_per_s"], 1.0, "ge")]
            if rr:
                checks.insert(1, ("p99 TTFT <= 1/4 nginx round-robin", r["ttft_p99"], rr["ttft_p99"], 0.25,
                                  "le"))
            for what, mine, theirs, f, op in checks:
                if mine is None or theirs is None:
                    out.append(f"{mix} {load:.0%}: {what}: no data")
                    continue
                met = mine <= f * theirs if op == "le" else mine >= f * theirs
                out.append(f"{mix} {load:.0%}: {what}: olb {mine:.2f} vs {theirs:.2f} -> "
                           f"{'MET' if met else 'NOT MET'}")
        if mix == "control" and lc:
            for what, key, worse in (("p99 TTFT", "ttft_p99", "higher"),
                                     ("throughput", "tokens_per_s", "lower")):
                mine, theirs = r[key], lc[key]
                if mine is None or theirs is None:
                    continue
                ok = mine <= 1.05 * theirs if worse == "higher" else mine >= 0.95 * theirs
                out.append(f"control {load:.0%}: {what} within 5% of nginx least_conn: olb {mine:.2f} vs "
                           f"{theirs:.2f} -> {'MET' if ok else 'NOT MET'}")
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.scheduling",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--loads", default="0.4,0.8,1.1", help="fractions of the estimated capacity (llm mix)")
    ap.add_argument("--control-loads", default="0.8", help="loads of the no-sharing control mix ('' = none)")
    ap.add_argument("--duration", type=float, default=90.0, help="simulated seconds of arrivals per run")
    ap.add_argument("--drain", type=float, default=40.0,
                    help="simulated seconds after the arrivals for open requests to finish")
    ap.add_argument("--warmup", type=float, default=15.0,
                    help="simulated seconds at the start whose requests are not in the latency figures")
    ap.add_argument("--time-scale", type=float, default=10.0, help="simulated seconds per real second")
    ap.add_argument("--parallel", type=int, default=2, help="slots per loaded model (OLLAMA_NUM_PARALLEL)")
    ap.add_argument("--olb-max", type=int, default=8, help="olb's max= per backend")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective for goodput, simulated s")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", 
                    help="olb, olb-lif, nginx-lc; 80 %% and the control; 50 simulated s each")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/scheduling-<time>.json)")
    ap.add_argument("--serve-sims", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.targets, args.loads, args.duration, args.drain = "olb,olb-lif,nginx-lc", "0.8", 50.0, 30.0
    return args


async def main_async(args) -> dict:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in targets:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
    runnable = []
    for t in targets:
        why = missing(t)
        if why:
            print(why, file=sys.stderr)
        else:
            runnable.append(t)
    plan = [("llm", float(x)) for x in args.loads.split(",") if x.strip()]
    plan += [("control", float(x)) for x in args.control_loads.split(",") if x.strip()]
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="olb-sched-") as tmp:
        for mix, load in plan:
            for t in runnable:
                t1 = time.monotonic()
                row = await run_one(t, mix, load, args, tmp)
                rows.append(row)
                print(f"{mix:7} {load:4.0%} {t:10} req {row['requests']:4}  ttft p99 {_f(row['ttft_p99'])}  "
                      f"tok/s {row['tokens_per_s']:.0f}  loads {row['loads']}  "
                      f"({time.monotonic() - t1:.0f} s)", file=sys.stderr, flush=True)
    return {"benchmark": "scheduling", "machine": machine(), "argv": sys.argv[1:],
            "args": {k: v for k, v in vars(args).items() if k != "serve_sims"},
            "cluster": CLUSTER, "models": MODELS, "wall_s": time.monotonic() - started, "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.serve_sims:
        asyncio.run(_serve_sims(json.loads(args.serve_sims)))
        return
    result = asyncio.run(main_async(args))
    out = args.out or os.path.join(RESULTS, time.strftime("scheduling-%Y%m%d-%H%M%S.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result["rows"]))
    print()
    for line in verdict(result["rows"]):
        print("- " + line)
    print(f"\n{len(result['rows'])} runs in {result['wall_s']:.0f} s; JSON: {out}")


if __name__ == "__main__":
    main()
