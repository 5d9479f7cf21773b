"""Scheduling: olb's scheduler against nginx and HAProxy on a simulated LLM cluster.

    python -m bench.scheduling                      # the default sweep, ~9 min on 2 cores
    python -m bench.scheduling --quick              # a smoke run (~1.5 min)
    python -m bench.scheduling --full               # every load x both arrival patterns x 3 seeds (~60 min)
    python -m bench.scheduling --issue13            # 3 cluster shapes x 70/80/90 % x 5 seeds (~25 min)
    python -m bench.scheduling --targets olb,nginx-lc --loads 1.1 --arrivals poisson --control-loads ''
    python -m bench.scheduling --cluster uniform8,big70b --seeds 1,2,3

The default run: the LLM mix at 20, 50, 80, 100 and 120 % load with Poisson
arrivals, at 80 % with bursty arrivals, and the control mix at 80 %, seed 1,
every target each time.  `--seeds 1,2,3` repeats the whole plan per seed and
reports the median of each figure with its range.  Results go to --out
(bench/results/): scheduling.json (every run, every measured TTFT),
scheduling.md (the tables and the issue's targets) and, with matplotlib,
scheduling_vs_load.png (p99 TTFT and throughput against load per target) and
scheduling_ttft_cdf.png (the TTFT distribution at 80 %).

The cluster (`--cluster`, CLUSTERS): simulated Ollama instances (olb.sim
with a simulated GPU each) in ONE child process, started fresh for every
(target, shape, mix, load, seed) so that every target begins from the same
cold GPUs.  `mixed` (the default): two fast (H100, 80 GiB) and two slow (RTX
3090 speeds, 12 GiB), six models; `uniform8`: eight RTX 4090 24 GB, ten
models; `big70b`: two H100 and two RTX 4090, the six models and a 70B that
fits only on the H100s (5 % of sessions; on a 24 GB card it spills to the
CPU, as in Ollama).  Everything runs `--time-scale` times
faster than real time; every time reported here is in SIMULATED seconds
(measured real time x time scale), so a 5 ms stall of this 2-core machine
shows as 5 ms x scale.

The workload (fixed seed, the same request list for every target):

* The shape's chat models with Zipf(s=1) popularity; the ranking rotates by
  one model at each third of the run (drift); `big70b`'s 70B has a fixed
  5 % share outside the rotation.
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
  A model that fits only some GPUs (the 70B) is served by those alone and
  the rest have what it leaves (see `capacity`).  Model loads are not
  counted, so 100 % is out of reach without affinity.
* The control mix: one model (llama3.1:8b), one-turn sessions with unique
  prompts, no shared prefix: nothing for a model- or cache-aware scheduler
  to win; olb should be within 5 % of least_conn there.

Targets: `olb` (OLB_POLICY=llm, the full scheduler: model awareness from
/api/ps, session affinity, DCGM utilisation from the sims' /metrics),
`olb-lif` (OLB_POLICY=least-inflight: plain least-in-flight) and `olb-rr`
(OLB_POLICY=round-robin) -- the same olb and settings, only the policy
differs -- `nginx-lc` (least_conn), `nginx-rr` (round-robin) and
`haproxy-lc` (leastconn), as configured by bench/targets.py.

Reported per target, shape, mix and load, over the requests issued after
the warm-up: TTFT p50/p99/p99.9 (to the first streamed NDJSON line; a
request still waiting for it when the drain ends counts with the time it
waited, see `ttft_values`), end-to-end p99, throughput (eval tokens of
completed requests / simulated time from the first request to the last
completion), goodput (completed requests with TTFT <= --slo-ttft, per
simulated second), the 503 and other-error shares (requests still open at
the end of the drain count as errors), and over the whole run: requests
unfinished at the end of the drain, model loads and simulated GPU-seconds
spent loading, simulated seconds the instances spent waiting on evictions
(each instance's `GET /sim/stats`, read before the sims stop; "n/a" where an
olb.sim has no such endpoint), the prompt cache hit rate (cached / total
prompt tokens, from the sims' engines), the share of time each GPU was
busy, and the proxy's CPU seconds.  The report (bench/scheduling_report.py)
gives the median over seeds with the min-max range, and checks issue 13's
targets per shape, arrival pattern and load.
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

from .load import http_get
from .proc import Child, CpuSample, cpu_delta, find_exe, machine
from .targets import Running, TargetSpec, _listening_socket, _private_dir, nginx_conf, wait_ready

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
#: The chat models of the `mixed` shape's LLM mix; the last two are stand-ins (see _extra_specs).
MODELS = ("llama3.1:8b", "qwen2.5:7b", "mistral:latest", "llama3.2:latest", "gemma2:9b", "phi3:14b")
#: `uniform8`'s ten: MODELS and four more, from 1.3 to 9.0 GB.
MODELS10 = MODELS + ("qwen2.5:14b", "mistral-nemo:12b", "gemma2:2b", "llama3.2:1b")
CONTROL_MODEL = "llama3.1:8b"
#: The 70B of `big70b` (olb.sim's catalogue: 42.5 GB Q4_K_M, as in runpod/docs PR #839): with
#: its KV cache and graph ~45 GB, so it fits on an 80 GB card and spills to the CPU on a 24 GB one.
BIG_MODEL = "llama3.1:70b"
#: The runner context the sims give a request without options.num_ctx (SimConfig.num_ctx).
NUM_CTX = 4096


@dataclasses.dataclass(frozen=True)
class Shape:
    """A simulated cluster: its GPUs and the models of its LLM mix.

    `models` have Zipf(s=1) popularity whose ranking rotates by one at each
    third of the run; `fixed` models take a constant share of the sessions
    outside the rotation (the rotating ones share the rest)."""

    name: str
    gpus: tuple            # ((instance name, GPU profile, VRAM GiB or None for the profile's), ...)
    models: tuple
    fixed: tuple = ()      # ((model, share of sessions), ...)
    about: str = ""

    @property
    def all_models(self) -> tuple:
        return self.models + tuple(m for m, _ in self.fixed)


#: The cluster shapes of `--cluster` (bench/README.md, "Cluster shapes").
CLUSTERS = {s.name: s for s in (
    Shape("mixed", (("fast-0", "h100", None), ("fast-1", "h100", None),
                    ("slow-0", "rtx3090", 12), ("slow-1", "rtx3090", 12)), MODELS,
          about="2 × H100 80 GB + 2 × RTX 3090 speeds with 12 GB; 6 models (every one fits everywhere)"),
    Shape("uniform8", tuple((f"gpu-{i}", "rtx4090", None) for i in range(8)), MODELS10,
          about="8 × RTX 4090 24 GB; 10 models of 1.3-9.0 GB (3 at most resident per GPU)"),
    Shape("big70b", (("big-0", "h100", None), ("big-1", "h100", None),
                     ("small-0", "rtx4090", None), ("small-1", "rtx4090", None)), MODELS,
          fixed=((BIG_MODEL, 0.05),),
          about="2 × H100 80 GB + 2 × RTX 4090 24 GB; the 6 models and llama3.1:70b (5 % of "
                "sessions), which fits only on the H100s"),
)}
#: The `mixed` shape's GPUs (the cluster of the results before --cluster existed).
CLUSTER = CLUSTERS["mixed"].gpus
WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at "
         "which but have an they you were her she there been one all we their has would when if "
         "so no what up out them some could into more time only other then these two may first "
         "any new very like our over such after most make even well back through where much "
         "before must right same down should because each those people about how just").split()


# --- the simulated cluster (a child process) ------------------------------------------------------


#: Stand-ins: (name, parameter size, parameter count, bytes of the library's default Q4_K_M tag).
#: Their geometry is llama3.1:8b's; their speed follows from the size (olb/sim/gpu.py's law).
_STAND_INS = (("gemma2:9b", "9.2B", 9241705984, 5443152417),
              ("phi3:14b", "14.0B", 13960238080, 7898828608),
              ("qwen2.5:14b", "14.8B", 14770033664, 8988110976),
              ("mistral-nemo:12b", "12.2B", 12247782400, 7071713232),
              ("gemma2:2b", "2.6B", 2614341888, 1629518495))


def _extra_specs() -> dict:
    from olb.sim.catalogue import KNOWN_MODELS

    base = KNOWN_MODELS["llama3.1:8b"]
    return {name: dataclasses.replace(base, name=name, parameter_size=psize, parameter_count=count, size=size)
            for name, psize, count, size in _STAND_INS}


def _model_spec(name: str):
    from olb.sim.catalogue import KNOWN_MODELS

    return KNOWN_MODELS.get(name) or _extra_specs()[name]


def _profile(gpu: str, vram_gib):
    from olb.sim.gpu import PROFILES

    p = PROFILES[gpu]
    return p.replace(vram=int(vram_gib * 2**30)) if vram_gib else p


def fits(model: str, gpu: str, vram_gib, parallel: int) -> bool:
    """Whether `model`'s runner (weights, KV cache for NUM_CTX x `parallel`, graph) fits alone in
    the GPU's memory.  One that does not still loads, with the rest in system RAM (spilled, the
    CPU share at a tenth of the speed: olb/sim/gpu.py), as Ollama does."""
    from olb.sim.gpu import runner_bytes

    return runner_bytes(_model_spec(model), NUM_CTX, parallel) <= _profile(gpu, vram_gib).vram


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
    from olb.sim.catalogue import KNOWN_MODELS

    _install_counters()
    models = [m if m in KNOWN_MODELS else _extra_specs()[m] for m in spec["models"]]
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
    """A shape's instances in a child process; `stats()` reads their /sim/stats, `stop()`
    returns their counters."""

    def __init__(self, args, shape: Shape, models: tuple, seed: int, tmp: str):
        self.dump = os.path.join(tmp, f"sims-{time.monotonic_ns()}.json")
        spec = {"cluster": shape.gpus, "models": list(models), "parallel": args.parallel,
                "time_scale": args.time_scale, "seed": seed, "dump": self.dump}
        self.child = Child([sys.executable, "-m", "bench.scheduling", "--serve-sims", json.dumps(spec)],
                           dict(os.environ), rb"^sim (\S+)", len(shape.gpus))
        self.urls = self.child.found

    async def stats(self) -> list:
        """Each instance's `GET /sim/stats` (loads, evictions, simulated seconds waiting on
        evictions, ...), in the order of the shape's GPUs; None for an instance without the
        endpoint (404) or that did not answer with a JSON object."""
        return list(await asyncio.gather(*(sim_stats(u) for u in self.urls)))

    def stop(self) -> list:
        self.child.stop()
        try:
            with open(self.dump) as f:
                return json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"the sims left no counters:\n{self.child.stderr_tail()}") from None


async def sim_stats(url: str) -> dict | None:
    """One instance's /sim/stats as a dict, or None where it has none (404) or answers oddly."""
    host, port = _hostport(url)
    try:
        status, body = await http_get(host, port, "/sim/stats")
        out = json.loads(body) if status == 200 else None
    except (OSError, asyncio.TimeoutError, ValueError, ConnectionError):
        return None
    return out if isinstance(out, dict) else None


# --- targets --------------------------------------------------------------------------------------


def _hostport(url: str) -> tuple[str, int]:
    host, port = url.rsplit("//", 1)[1].rsplit(":", 1)
    return host, int(port)


#: olb's periods and timeouts in SIMULATED seconds: olb reads real time, so the benchmark divides
#: them by the time scale, and a faster run sees the cluster as often per simulated second
#: (at the default scale 10: health 1 s, GPU poll 0.5 s, /api/ps 1 s, queue timeout olb's 30 s).
OLB_SIM_SECONDS = {"OLB_HEALTH_INTERVAL": 10.0, "OLB_GPU_POLL": 5.0, "OLB_MODELS_INTERVAL": 10.0,
                   "OLB_QUEUE_TIMEOUT": 300.0}


def olb_env(urls: list[str], policy: str, olb_max: int, time_scale: float) -> dict:
    """The OLB_* settings of an olb target (added to the environment)."""
    spec = ",".join(f"{u};max={olb_max};metrics={u}/metrics" for u in urls)
    env = {"OLB_BACKENDS": spec, "OLB_LISTEN": "127.0.0.1:0", "OLB_ADMIN_LISTEN": "off",
           "OLB_WORKERS": "1", "OLB_LOG_LEVEL": "warning",
           "OLB_SESSION_BOUND": "1.25", "OLB_POLICY": policy}
    env.update({k: f"{v / time_scale:g}" for k, v in OLB_SIM_SECONDS.items()})
    return env


def start_target(name: str, urls: list[str], args, tmp: str) -> Running:
    backends = [_hostport(u) for u in urls]
    if name in OLB_POLICIES:
        # Every olb target gets the same backends (with their DCGM pages) and settings; OLB_POLICY
        # alone decides how much of the scheduler is used (the plain policies read neither
        # models, conversations nor GPU metrics).
        env = dict(os.environ, **olb_env(urls, OLB_POLICIES[name], args.olb_max, args.time_scale))
        root = getattr(args, "olb_root", None)
        if root:
            # Another checkout's olb: `python -m olb` finds its package first.
            root = os.path.abspath(root)
            env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        child = Child([sys.executable, "-m", "olb"], env, rb"listening on http://(\S+)", 1, cwd=root)
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


def _popularity(t: float, duration: float, s: float = 1.0, shape: Shape | None = None) -> list[float]:
    """Weights of the shape's `all_models` (default `mixed`) at simulated time t: Zipf over its
    rotating models, the ranking rotated by one at each third, then its fixed shares."""
    shape = shape or CLUSTERS["mixed"]
    epoch = min(2, int(3 * t / duration)) if duration > 0 else 0
    n = len(shape.models)
    w = [0.0] * n
    for rank in range(n):
        w[(rank + epoch) % n] = 1.0 / (rank + 1) ** s
    if not shape.fixed:
        return w
    rest = 1.0 - sum(share for _, share in shape.fixed)
    total = sum(w)
    return [x * rest / total for x in w] + [share for _, share in shape.fixed]


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
                  arrivals: str = "poisson", cluster: str = "mixed") -> list[Session]:
    """Sessions for `duration` simulated seconds at `rate_req` requests per simulated second,
    of the models of the cluster shape's LLM mix (or the control's one model).

    The same arguments give the same sessions (start times, models, texts, lengths): every
    target of a run is sent the same list."""
    shape = CLUSTERS[cluster]
    models = shape.all_models
    rng = random.Random(f"{seed}:{mix}")
    systems = {m: f"You are assistant {m}. " + _text(random.Random(f"{seed}:sys:{m}"), 3000)
               for m in models}
    mean_turns = 4.0 if mix == "llm" else 1.0
    rate_sessions = rate_req / mean_turns
    sessions = []
    # Start times from their own generator: the sessions' contents do not depend on them.
    for t in arrival_times(random.Random(f"{seed}:{mix}:{arrivals}"), rate_sessions, duration, arrivals):
        if mix == "llm":
            model = rng.choices(models, _popularity(t, duration, shape=shape))[0]
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


def capacity(mix: str, sessions: list[Session], parallel: int, duration: float,
             cluster: str = "mixed") -> dict:
    """Requests per simulated second the cluster serves with a full batch, no cache and no loads.

    A model's cost on a GPU: prefill of the mean prompt plus decode of the mean output at a
    full batch of `parallel`.  Models that fit every GPU ("free") are served by all GPUs, each
    at the inverse of its popularity-weighted mean cost.  A model that fits only some GPUs
    (`fits`) is served only by those, its requests spread in proportion to their speed so that
    each spends the same share of its time on it; the free models have what is left:
    lam (1 - w_R) = sum_g (1 - lam sum_{m on g} w_m / S_m) / C_g, with w the popularity shares
    (w_R the restricted models'), C_g the mean cost of a free-model request on g and S_m the sum
    over m's GPUs of their requests per second of m alone; solved for lam, and capped where a
    GPU would spend all its time on restricted models."""
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
    shape = CLUSTERS[cluster]
    if mix == "llm":
        steps = 60
        models = shape.all_models
        w = [0.0] * len(models)
        for i in range(steps):
            for k, x in enumerate(_popularity((i + 0.5) * duration / steps, duration, shape=shape)):
                w[k] += x
    else:
        w, models = [1.0], (CONTROL_MODEL,)
    total = sum(w)
    w = [x / total for x in w]
    gpus = [_profile(gpu, vram) for _name, gpu, vram in shape.gpus]
    # cost[m][g]: simulated seconds of GPU g per request of model m.
    cost = []
    for m in models:
        spec = _model_spec(m)
        row = []
        for p in gpus:
            decode = out_mean * (1 + p.alpha * (parallel - 1)) / (p.eval_rate(spec) * parallel)
            row.append(prompt_mean / p.prompt_rate(spec) + decode)
        cost.append(row)
    where = [[fits(m, gpu, vram, parallel) for _n, gpu, vram in shape.gpus] for m in models]
    for m, ok in zip(models, where):
        if not any(ok):
            raise ValueError(f"{m} fits no GPU of {cluster}")
    free = [k for k, ok in enumerate(where) if all(ok)]
    restricted = [k for k, ok in enumerate(where) if not all(ok)]
    w_free = sum(w[k] for k in free)
    # per_gpu: requests per second of the free mix on each GPU alone (1 / C_g).
    per_gpu = [w_free / sum(w[k] * cost[k][g] for k in free) if free else 0.0 for g in range(len(gpus))]
    # busy: the share of each GPU's time the restricted models take, per unit of lam.
    busy = [0.0] * len(gpus)
    for k in restricted:
        s_k = sum(1 / cost[k][g] for g in range(len(gpus)) if where[k][g])
        for g in range(len(gpus)):
            if where[k][g]:
                busy[g] += w[k] / s_k
    lam = sum(per_gpu) / (w_free + sum(b * r for b, r in zip(busy, per_gpu)))
    lam = min([lam] + [1 / b for b in busy if b > 0])
    return {"req_per_s": lam, "per_gpu": per_gpu, "restricted_share": [lam * b for b in busy],
            "out_mean": out_mean, "prompt_mean_tokens": prompt_mean,
            "models": list(models), "weights": w, "fits": where}


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
    # Unfinished at the end of the drain without a first token: simulated seconds it waited.
    waited: float | None = None


#: The error of a request still open when the drain ends.
UNFINISHED = "unfinished at the end of the drain"


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
    end = sim_now()
    for r in results:
        if r.e2e is None and not r.error:
            r.error = UNFINISHED
            if r.ttft is None:
                r.waited = end - r.issued
    return results


# --- one configuration ----------------------------------------------------------------------------


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def ttft_values(measured: list[Result]) -> list[float]:
    """The TTFTs of the percentiles: every request that got its first token without an error,
    and every request still open at the end of the drain -- with the time it waited when no
    token came (a lower bound: a stall must not leave the tail by never ending)."""
    out = []
    for r in measured:
        if r.error == UNFINISHED:
            out.append(r.ttft if r.ttft is not None else r.waited)
        elif r.ttft is not None and not r.error:
            out.append(r.ttft)
    return [x for x in out if x is not None]


def sim_figures(stats: list) -> dict:
    """The figures of the instances' /sim/stats: summed, the worst instance's eviction wait,
    None ("n/a") when an instance has no such endpoint."""
    have = bool(stats) and all(isinstance(s, dict) for s in stats)

    def total(key, cast=float):
        if not have or not all(isinstance(s.get(key), (int, float)) for s in stats):
            return None
        return cast(sum(s[key] for s in stats))

    wait = total("eviction_wait_s")
    return {"eviction_wait_s": wait,
            "eviction_wait_max_s": max(s["eviction_wait_s"] for s in stats) if wait is not None else None,
            "sim_loads": total("loads", int), "sim_reloads": total("reloads", int),
            "sim_pending": total("pending", int)}


def summarise(results: list[Result], sims: list, cpu: dict, args, stats: list | None = None) -> dict:
    """One run's figures.  `sims`: the instances' counters from the sims' process; `stats`:
    their /sim/stats (None where missing)."""
    measured = [r for r in results if r.issued >= args.warmup]
    ok = [r for r in measured if r.e2e is not None]
    n = len(measured) or 1
    ttft = ttft_values(measured)
    first = min((r.issued for r in measured), default=0.0)
    last = max((r.done_at for r in ok), default=first)
    span = max(1e-9, last - first)
    good = [r for r in ok if r.ttft <= args.slo_ttft]
    prompt = sum(s["prompt_tokens"] for s in sims)
    return {
        "requests": len(measured), "completed": len(ok),
        "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99), "ttft_p999": _pct(ttft, 99.9),
        # Every request of the run, the warm-up's too: still open when the drain ended.
        "unfinished": sum(r.error == UNFINISHED for r in results),
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
        **sim_figures(stats or []), "sim_stats": stats,
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
    cluster: str = "mixed"   # a CLUSTERS shape


async def run_one(target: str, point: Point, args, tmp: str) -> dict:
    """One target on one point: fresh sims, the target, the load, the figures.  `target` may
    carry a tag (`olb@before`): the row is named so, the policy is the part before the @."""
    mix = point.mix
    shape = CLUSTERS[point.cluster]
    models = shape.all_models if mix == "llm" else (CONTROL_MODEL,)
    probe = make_sessions(mix, 1.0, args.duration, point.seed, cluster=point.cluster)
    cap = capacity(mix, probe, args.parallel, args.duration, cluster=point.cluster)
    sessions = make_sessions(mix, point.load * cap["req_per_s"], args.duration, point.seed, point.arrivals,
                             cluster=point.cluster)
    sims = Sims(args, shape, models, point.seed, tmp)
    running = None
    stats = None
    try:
        running = start_target(target.partition("@")[0], sims.urls, args, tmp)
        await wait_ready(running)
        pids = running.refresh_pids()
        before = CpuSample(pids)
        results = await drive(running.addresses[0], sessions, args, {})
        cpu = cpu_delta(before, CpuSample(pids))
        # Before the sims stop: their own books of loads and eviction waits.
        stats = await sims.stats()
    finally:
        if running is not None:
            running.stop()
        counters = sims.stop()
    row = summarise(results, counters, cpu, args, stats)
    row.update(target=target, **dataclasses.asdict(point), capacity_req_s=cap["req_per_s"],
               offered_req_s=point.load * cap["req_per_s"])
    return row


# --- the plan and the command line ----------------------------------------------------------------

DEFAULT_LOADS = "0.2,0.5,0.8,1.0,1.2"
FULL_LOADS = "0.2,0.4,0.6,0.8,0.9,1.0,1.1,1.2"


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def plan(args) -> list[Point]:
    """The points of a run: per cluster shape the LLM mix at each load per arrival pattern, then
    the control mix on --control-cluster, each seed; seeds outermost, so a run cut short has
    whole sweeps of every shape."""
    arrivals = _names(args.arrivals)
    points = []
    for seed in [int(x) for x in _names(args.seeds)]:
        for cluster in _names(args.cluster):
            if "poisson" in arrivals:
                points += [Point("llm", "poisson", x, seed, cluster) for x in _floats(args.loads)]
            if "bursty" in arrivals:
                points += [Point("llm", "bursty", x, seed, cluster) for x in _floats(args.bursty_loads)]
        points += [Point("control", "poisson", x, seed, args.control_cluster)
                   for x in _floats(args.control_loads)]
    return points


#: Flags a preset sets unless given on the command line, and their plain defaults.
DEFAULTS = {"targets": ",".join(TARGETS), "loads": DEFAULT_LOADS, "arrivals": "poisson,bursty",
            "bursty_loads": "0.8", "control_loads": "0.8", "seeds": "1", "cluster": "mixed",
            "control_cluster": None, "duration": 90.0, "drain": 40.0, "warmup": 15.0, "time_scale": 10.0}
PRESETS = {
    "full": {"loads": FULL_LOADS, "bursty_loads": FULL_LOADS, "arrivals": "poisson,bursty", "seeds": "1,2,3"},
    "quick": {"targets": "olb,olb-lif,olb-rr,nginx-lc", "loads": "0.8", "arrivals": "poisson",
              "duration": 50.0, "drain": 30.0},
    # Issue 13's matrix in ~35 min on 2 idle cores (bench/README.md says what each choice costs).
    "issue13": {"targets": "olb,nginx-lc,nginx-rr", "cluster": "mixed,uniform8,big70b", "loads": "0.7,0.8,0.9",
                "arrivals": "poisson,bursty", "bursty_loads": "0.8", "control_loads": "0.8",
                "control_cluster": "mixed", "seeds": "1,2,3,4,5", "duration": 90.0, "drain": 60.0,
                "warmup": 15.0, "time_scale": 20.0},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.scheduling",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    ap.add_argument("--targets", help=f"comma-separated, of {', '.join(TARGETS)} (default: all)")
    ap.add_argument("--cluster",
                    help=f"comma-separated cluster shapes, of {', '.join(CLUSTERS)} (default: {d['cluster']})")
    ap.add_argument("--control-cluster", help="the shape of the control mix (default: the first of --cluster)")
    ap.add_argument("--loads", help=f"LLM-mix loads with Poisson arrivals, fractions of the estimated capacity "
                                    f"(default: {d['loads']})")
    ap.add_argument("--arrivals", help="arrival patterns to run: poisson (at --loads), bursty (at --bursty-loads)"
                                       f" (default: {d['arrivals']})")
    ap.add_argument("--bursty-loads", help=f"LLM-mix loads with bursty arrivals (default: {d['bursty_loads']})")
    ap.add_argument("--control-loads", help=f"loads of the no-sharing control mix ('' = none; default: "
                                            f"{d['control_loads']})")
    ap.add_argument("--seeds", help="comma-separated workload seeds; figures are medians over them (default: 1)")
    ap.add_argument("--full", action="store_true",
                    help=f"every load ({FULL_LOADS}) with both arrival patterns, seeds 1,2,3 (~60 min)")
    ap.add_argument("--quick", action="store_true",
                    help="olb, olb-lif, olb-rr, nginx-lc; 80 %% Poisson and the control; 50 simulated s each")
    ap.add_argument("--issue13", action="store_true",
                    help="issue 13's matrix: shapes mixed, uniform8, big70b at 70/80/90 %% Poisson and "
                         "80 %% bursty, "
                         "the control on mixed, seeds 1-5; olb, nginx-lc, nginx-rr; 90 + 60 simulated s at "
                         "time scale 20 (195 runs, ~25 min on 2 idle cores)")
    ap.add_argument("--duration", type=float,
                    help=f"simulated seconds of arrivals per run (default: {d['duration']:g})")
    ap.add_argument("--drain", type=float,
                    help=f"simulated seconds after the arrivals for open requests to finish "
                         f"(default: {d['drain']:g})")
    ap.add_argument("--warmup", type=float,
                    help=f"simulated seconds at the start whose requests are not in the latency figures "
                         f"(default: {d['warmup']:g})")
    ap.add_argument("--time-scale", type=float,
                    help=f"simulated seconds per real second (default: {d['time_scale']:g})")
    ap.add_argument("--parallel", type=int, default=2, help="slots per loaded model (OLLAMA_NUM_PARALLEL)")
    ap.add_argument("--olb-max", type=int, default=8, help="olb's max= per backend")
    ap.add_argument("--olb-root", default=None,
                    help="run olb's targets from this checkout (its working directory and PYTHONPATH; build its "
                         "extensions first): an older olb against this tree's simulator and load")
    ap.add_argument("--olb-tag", default="",
                    help="name olb's targets NAME@TAG in the results (olb@before), so that `python -m bench plot` "
                         "can merge them beside another run's")
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT objective for goodput, simulated s")
    ap.add_argument("--out", default=RESULTS,
                    help="directory for scheduling.json, scheduling.md and the PNG plots")
    ap.add_argument("--serve-sims", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    chosen = [name for name in PRESETS if getattr(args, name)]
    if len(chosen) > 1:
        ap.error("--" + " and --".join(chosen) + ": choose one preset")
    preset = PRESETS[chosen[0]] if chosen else {}
    # A flag given on the command line wins over the preset, the preset over the default.
    for key, value in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, preset.get(key, value))
    if args.control_cluster is None:
        args.control_cluster = (_names(args.cluster) or ["mixed"])[0]
    for a in _names(args.arrivals):
        if a not in ARRIVALS:
            ap.error(f"--arrivals: unknown pattern {a!r}; known: {', '.join(ARRIVALS)}")
    for c in _names(args.cluster) + [args.control_cluster]:
        if c not in CLUSTERS:
            ap.error(f"--cluster: unknown shape {c!r}; known: {', '.join(CLUSTERS)}")
    if args.olb_tag and ("@" in args.olb_tag or "," in args.olb_tag):
        ap.error("--olb-tag: no '@' or ','")
    if args.olb_root and not os.path.isdir(os.path.join(args.olb_root, "olb")):
        ap.error(f"--olb-root: {args.olb_root} has no olb/ package")
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
    # An olb from another checkout is named apart (olb@before), so its rows merge beside these.
    runnable = [f"{t}@{args.olb_tag}" if args.olb_tag and t in OLB_POLICIES else t for t in runnable]
    progress = Progress(len(points) * len(runnable))
    seconds = (args.duration + args.drain) / args.time_scale
    rows = []
    started = time.monotonic()
    once = {"machine": machine(),
            "olb": {"root": os.path.abspath(args.olb_root or os.getcwd()), "commit": _commit(args.olb_root)}}
    with tempfile.TemporaryDirectory(prefix="olb-sched-") as tmp:
        for point in points:
            for t in runnable:
                step = progress.begin()
                mix = point.cluster if point.mix == "llm" else f"control/{point.cluster}"
                label = f"{step} {mix} {point.arrivals} {point.load:.0%} seed {point.seed} {t}"
                t1 = time.monotonic()
                bar = asyncio.ensure_future(progress.watch(label, seconds))
                try:
                    row = await run_one(t, point, args, tmp)
                finally:
                    bar.cancel()
                    await asyncio.gather(bar, return_exceptions=True)
                rows.append(row)
                # What has run so far, readable by `python -m bench plot` if the rest never comes.
                _dump(_result(args, once, points, rows, started),
                      os.path.join(args.out, "scheduling.partial.json"))
                progress.say(f"{label:56} req {row['requests']:4}  ttft p99 {_f(row['ttft_p99'])}  "
                             f"tok/s {row['tokens_per_s']:.0f}  loads {row['loads']}  "
                             f"evict wait {_f(row['eviction_wait_s'], '{:.0f}', 'n/a')}  "
                             f"unfinished {row['unfinished']}  ({time.monotonic() - t1:.0f} s)")
    return _result(args, once, points, rows, started)


def _dump(result: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


def _result(args, once: dict, points: list[Point], rows: list[dict], started: float) -> dict:
    return {"benchmark": "scheduling", "machine": once["machine"], "argv": sys.argv[1:],
            "command": args.command,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "args": {k: v for k, v in vars(args).items() if k not in ("serve_sims", "command")},
            "burst": {"factor": BURST_FACTOR, "on_s": BURST_ON_S, "off_s": BURST_OFF_S},
            "cluster": CLUSTER, "models": MODELS,
            "clusters": {c: dataclasses.asdict(CLUSTERS[c]) for c in sorted({p.cluster for p in points})},
            "olb": once["olb"], "wall_s": time.monotonic() - started, "rows": rows}


def _commit(root: str | None) -> str | None:
    """The git commit olb's targets ran from (with '+dirty' for uncommitted changes), or None."""
    import subprocess

    cwd = root or os.getcwd()
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


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
    partial = os.path.join(args.out, "scheduling.partial.json")
    if os.path.exists(partial):
        os.remove(partial)
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


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


if __name__ == "__main__":
    main()
