"""Scheduling: olb's scheduler against nginx and HAProxy on a simulated LLM cluster.

    python -m bench.scheduling                      # the default sweep, ~9 min on 2 cores
    python -m bench.scheduling --quick              # a smoke run (~1.5 min)
    python -m bench.scheduling --full               # every load x both arrival patterns x 3 seeds (~60 min)
    python -m bench.scheduling --targets olb,nginx-lc --loads 1.1 --arrivals poisson --control-loads ''

The default run: the LLM mix at 20, 50, 80, 100 and 120 % load with Poisson
arrivals, at 80 % with bursty arrivals, and the control mix at 80 %, seed 1,
every target each time.  `--seeds 1,2,3` repeats the whole plan per seed and
reports the median of each figure with its range.  Results go to --out
(bench/results/): scheduling.json (every run, every measured TTFT),
scheduling.md (the tables and the issue's targets) and, with matplotlib,
scheduling_vs_load.png (p99 TTFT and throughput against load per target) and
scheduling_ttft_cdf.png (the TTFT distribution at 80 %).

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
* Arrivals: sessions start as a Poisson process, or (`bursty`) as a
  Markov-modulated Poisson process with the same mean rate: "on" spells
  (exponential, mean 10 simulated s) at 2x the mean rate alternate with
  "off" spells (mean 20 s) at 0.5x, so 80 % load swings between 40 % and
  160 % (BURST_FACTOR, BURST_ON_S, BURST_OFF_S).  Start times come from
  their own generator, seeded by (seed, mix, pattern): the same seed gives
  every target the same request list.
* Multi-turn sessions: each session has a
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

Targets: `olb` (OLB_POLICY=llm, the full scheduler: model awareness from
/api/ps, session affinity, DCGM utilisation from the sims' /metrics),
`olb-lif` (OLB_POLICY=least-inflight: plain least-in-flight) and `olb-rr`
(OLB_POLICY=round-robin) -- the same olb and settings, only the policy
differs -- `nginx-lc` (least_conn), `nginx-rr` (round-robin) and
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
import shlex
import signal
import sys
import tempfile
import time

from .proc import Child, CpuSample, cpu_delta, find_exe, machine
from .targets import (Running, TargetSpec, _listening_socket, _private_dir, nginx_conf,
                      wait_ready)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

TARGETS = ("olb", "olb-lif", "olb-rr", "nginx-lc", "nginx-rr", "haproxy-lc")
#: olb's targets: the same olb and backends, only OLB_POLICY differs.
OLB_POLICIES = {"olb": "llm", "olb-lif": "least-inflight", "olb-rr": "round-robin"}
ARRIVALS = ("poisson", "bursty")
#: Bursty arrivals: a Markov-modulated Poisson process with two states. "On"
#: spells (exponential, mean BURST_ON_S simulated seconds) run at BURST_FACTOR
#: times the mean rate, "off" spells (mean BURST_OFF_S) at the rate that keeps
#: the long-run mean: (1 - f * BURST_FACTOR) / (1 - f) with f = on / (on + off),
#: 0.5x for the values here -- a 4:1 swing, so 80 % load peaks at 160 %.
BURST_FACTOR = 2.0
BURST_ON_S = 10.0
BURST_OFF_S = 20.0
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
    for i, (_name, gpu, vram) in enumerate(spec["cluster"]):
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
    for (name, gpu, _vram), s, t0 in zip(spec["cluster"], servers, starts):
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

    def __init__(self, args, models: tuple, seed: int, tmp: str):
        self.dump = os.path.join(tmp, f"sims-{time.monotonic_ns()}.json")
        spec = {"cluster": CLUSTER, "models": list(models), "parallel": args.parallel,
                "time_scale": args.time_scale, "seed": seed, "dump": self.dump}
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
    if name in OLB_POLICIES:
        # Every olb target gets the same backends (with their DCGM pages) and settings; OLB_POLICY
        # alone decides how much of the scheduler is used (the plain policies read neither
        # models, conversations nor GPU metrics).
        spec = ",".join(f"{u};max={args.olb_max};metrics={u}/metrics" for u in urls)
        env = dict(os.environ, OLB_BACKENDS=spec, OLB_LISTEN="127.0.0.1:0", OLB_WORKERS="1",
                   OLB_HEALTH_INTERVAL="1", OLB_LOG_LEVEL="warning", OLB_GPU_POLL="0.5",
                   OLB_MODELS_INTERVAL="1", OLB_SESSION_BOUND="1.25", OLB_POLICY=OLB_POLICIES[name])
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


def arrival_times(rng: random.Random, rate: float, duration: float, arrivals: str):
    """Event times in [0, duration) at `rate` per simulated second on average: a Poisson
    process, or the bursty on/off process described at BURST_FACTOR."""
    if arrivals == "poisson":
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= duration:
                return
            yield t
    if arrivals != "bursty":
        raise ValueError(f"unknown arrivals {arrivals!r}; known: {', '.join(ARRIVALS)}")
    on_share = BURST_ON_S / (BURST_ON_S + BURST_OFF_S)
    low = (1 - on_share * BURST_FACTOR) / (1 - on_share)
    on = rng.random() < on_share          # start in the stationary distribution
    t = 0.0
    while t < duration:
        end = min(duration, t + rng.expovariate(1 / (BURST_ON_S if on else BURST_OFF_S)))
        state_rate = rate * (BURST_FACTOR if on else low)
        # Exponential gaps are memoryless: restarting the clock at each switch is exact.
        while True:
            t += rng.expovariate(state_rate)
            if t >= end:
                break
            yield t
        t, on = end, not on


def make_sessions(mix: str, rate_req: float, duration: float, seed: int,
                  arrivals: str = "poisson") -> list[Session]:
    """Sessions for `duration` simulated seconds at `rate_req` requests per simulated second.

    The same arguments give the same sessions (start times, models, texts, lengths): every
    target of a run is sent the same list."""
    rng = random.Random(f"{seed}:{mix}")
    systems = {m: f"You are assistant {m}. " + _text(random.Random(f"{seed}:sys:{m}"), 3000)
               for m in MODELS}
    mean_turns = 4.0 if mix == "llm" else 1.0
    rate_sessions = rate_req / mean_turns
    sessions = []
    # Start times from their own generator: the sessions' contents do not depend on them.
    for t in arrival_times(random.Random(f"{seed}:{mix}:{arrivals}"), rate_sessions, duration, arrivals):
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
    return sessions


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
        # For the CDF plot: every measured TTFT, ms resolution.
        "ttfts": [round(x, 3) for x in sorted(ttft)],
    }


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the plan; every target runs every point."""

    mix: str          # "llm" or "control"
    arrivals: str     # "poisson" or "bursty"
    load: float       # fraction of the estimated capacity
    seed: int


async def run_one(target: str, point: Point, args, tmp: str) -> dict:
    mix = point.mix
    models = MODELS if mix == "llm" else (CONTROL_MODEL,)
    probe = make_sessions(mix, 1.0, args.duration, point.seed)
    cap = capacity(mix, probe, args.parallel, args.duration)
    sessions = make_sessions(mix, point.load * cap["req_per_s"], args.duration, point.seed, point.arrivals)
    sims = Sims(args, models, point.seed, tmp)
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
    row.update(target=target, **dataclasses.asdict(point), capacity_req_s=cap["req_per_s"],
               offered_req_s=point.load * cap["req_per_s"])
    return row


# --- the plan and the command line ----------------------------------------------------------------

DEFAULT_LOADS = "0.2,0.5,0.8,1.0,1.2"
FULL_LOADS = "0.2,0.4,0.6,0.8,0.9,1.0,1.1,1.2"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def plan(args) -> list[Point]:
    """The points of a run: the LLM mix at each load per arrival pattern, the control mix, each
    seed; seeds outermost, so a run cut short has whole sweeps."""
    arrivals = [a.strip() for a in args.arrivals.split(",") if a.strip()]
    points = []
    for seed in [int(x) for x in args.seeds.split(",") if x.strip()]:
        if "poisson" in arrivals:
            points += [Point("llm", "poisson", x, seed) for x in _floats(args.loads)]
        if "bursty" in arrivals:
            points += [Point("llm", "bursty", x, seed) for x in _floats(args.bursty_loads)]
        points += [Point("control", "poisson", x, seed) for x in _floats(args.control_loads)]
    return points


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.scheduling",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    ap.add_argument("--loads", default=DEFAULT_LOADS,
                    help="LLM-mix loads with Poisson arrivals, fractions of the estimated capacity")
    ap.add_argument("--arrivals", default="poisson,bursty",
                    help="arrival patterns to run: poisson (at --loads), bursty (at --bursty-loads)")
    ap.add_argument("--bursty-loads", default="0.8", help="LLM-mix loads with bursty arrivals")
    ap.add_argument("--control-loads", default="0.8", help="loads of the no-sharing control mix ('' = none)")
    ap.add_argument("--seeds", default="1", help="comma-separated workload seeds; figures are medians over them")
    ap.add_argument("--full", action="store_true",
                    help=f"every load ({FULL_LOADS}) with both arrival patterns, seeds 1,2,3 (~60 min)")
    ap.add_argument("--duration", type=float, default=90.0, help="simulated seconds of arrivals per run")
    ap.add_argument("--drain", type=float, default=40.0,
                    help="simulated seconds after the arrivals for open requests to finish")
    ap.add_argument("--warmup", type=float, default=15.0,
                    help="simulated seconds at the start whose requests are not in the latency figures")
    ap.add_argument("--time-scale", type=float, default=10.0, help="simulated seconds per real second")
    ap.add_argument("--parallel", type=int, default=2, help="slots per loaded model (OLLAMA_NUM_PARALLEL)")
    ap.add_argument("--olb-max", type=int, default=8, help="olb's max= per backend")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective for goodput, simulated s")
    ap.add_argument("--quick", action="store_true",
                    help="olb, olb-lif, olb-rr, nginx-lc; 80 %% Poisson and the control; 50 simulated s each")
    ap.add_argument("--out", default=RESULTS,
                    help="directory for scheduling.json, scheduling.md and the PNG plots")
    ap.add_argument("--serve-sims", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.full:
        args.loads = args.bursty_loads = FULL_LOADS
        args.arrivals, args.seeds = "poisson,bursty", "1,2,3"
    if args.quick:
        args.targets, args.loads, args.arrivals = "olb,olb-lif,olb-rr,nginx-lc", "0.8", "poisson"
        args.duration, args.drain = 50.0, 30.0
    for a in args.arrivals.split(","):
        if a.strip() and a.strip() not in ARRIVALS:
            ap.error(f"--arrivals: unknown pattern {a.strip()!r}; known: {', '.join(ARRIVALS)}")
    return args


async def main_async(args) -> dict:
    from .progress import Progress

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
    points = plan(args)
    progress = Progress(len(points) * len(runnable))
    seconds = (args.duration + args.drain) / args.time_scale
    rows = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="olb-sched-") as tmp:
        for point in points:
            for t in runnable:
                step = progress.begin()
                label = f"{step} {point.mix} {point.arrivals} {point.load:.0%} seed {point.seed} {t}"
                t1 = time.monotonic()
                bar = asyncio.ensure_future(progress.watch(label, seconds))
                try:
                    row = await run_one(t, point, args, tmp)
                finally:
                    bar.cancel()
                    await asyncio.gather(bar, return_exceptions=True)
                rows.append(row)
                progress.say(f"{label:48} req {row['requests']:4}  ttft p99 {_f(row['ttft_p99'])}  "
                             f"tok/s {row['tokens_per_s']:.0f}  loads {row['loads']}  "
                             f"({time.monotonic() - t1:.0f} s)")
    return {"benchmark": "scheduling", "machine": machine(), "argv": sys.argv[1:],
            "command": args.command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "args": {k: v for k, v in vars(args).items() if k not in ("serve_sims", "command")},
            "burst": {"factor": BURST_FACTOR, "on_s": BURST_ON_S, "off_s": BURST_OFF_S},
            "cluster": CLUSTER, "models": MODELS, "wall_s": time.monotonic() - started, "rows": rows}


def main(argv=None) -> None:
    args = parse_args(argv)
    # The command as typed: `python -m bench scheduling ...` hands its flags over as argv.
    args.command = (f"python -m bench scheduling {shlex.join(argv)}" if argv is not None
                    else f"python -m bench.scheduling {shlex.join(sys.argv[1:])}").rstrip()
    if args.serve_sims:
        asyncio.run(_serve_sims(json.loads(args.serve_sims)))
        return
    result = asyncio.run(main_async(args))
    write(result, args.out)
    print(f"\n{len(result['rows'])} runs in {result['wall_s']:.0f} s")


def write(result: dict, outdir: str, name: str = "scheduling") -> None:
    """scheduling.json, scheduling.md and the plots into `outdir`; the Markdown to stdout."""
    from . import scheduling_report as report

    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, f"{name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = report.markdown(result)
    with open(os.path.join(outdir, f"{name}.md"), "w") as f:
        f.write(md)
    plots = report.plot(result, outdir, name)
    print(md)
    print(f"results: {os.path.join(outdir, name)}.json, .md")
    if plots:
        print("plots: " + ", ".join(plots))
    elif report.can_plot():
        print("plots: none (nothing to plot: a load sweep needs two loads of one arrival pattern, "
              "the CDF an LLM-mix run at 80 %)")
    else:
        print("plots: none (matplotlib is missing: pip install '.[bench]')")


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


if __name__ == "__main__":
    main()
