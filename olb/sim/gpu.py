"""The simulated GPU: profiles, memory, load times, speeds, utilisation, DCGM text.

Rules for this module: physics only -- how big, how fast, how busy.  It
decides nothing about *which* request runs (engine.py does) and formats no
HTTP (api.py does), except the DCGM exporter's Prometheus text, which is a
pure function of the state here.

Where the numbers come from:

* Speeds: every profile carries llama.cpp's measured single-stream rates
  for an 8B and a 70B Q4_K_M model (eval = decode tokens/s, prompt =
  prefill tokens/s), from the README of XiongjieDai/GPU-Benchmarks-on-LLM-
  Inference (LLaMA-3, 1024-token prompt and generation, 2024-05).  Ollama
  runs llama.cpp's llama-server (llm/llama_server.go), so these apply.
  Other models are placed on the power law through those two points by
  file size: rate(size) = r8 * (r70 / r8) ** x with
  x = log(size / size8) / log(size70 / size8).  Decode is memory-bandwidth
  bound and prefill compute bound, so both fall roughly with size; the law
  gives ~265 t/s for a 3B and ~90 k prompt t/s for a 137M embedding model.
* Loads: load_s = load_fixed_s + size / disk_bytes_per_s.  The defaults
  (0.5 s + 1.75 GB/s) give 3.3 s for an 8B q4 and 24.8 s for a 70B q4 from
  NVMe: Ollama's docs/api.md shows cold load_duration of 3-7 s for 3B-7B
  models; the 70B figure is the same law (no code sets it; users report
  far slower loads from network storage, ollama issue #4098).
* Memory: a runner takes weights + KV cache (num_ctx x num_parallel
  tokens, llm/llama_server.go, startLlamaServer's -c) + a compute graph.
  A model that does not fit even alone spills the rest to system RAM
  (`size_vram < size` in /api/ps) and runs at CPU_FACTOR of the GPU speed
  for the spilled share.
* Concurrency: n sequences of one model decode as a batch, each at
  r / (1 + alpha (n - 1)), alpha ~0.15 fitted to llama.cpp PR #16894's
  batched-bench figures (a fit, not a measurement of Ollama).  Different
  models on one GPU do not batch together: they take turns, so one decode
  round costs the sum of their batch step times and every sequence on the
  GPU advances one token per round.  Prefill is compute bound: the GPU's prompt throughput is shared
  equally by the requests prefilling at the same time (processor sharing).

Time: everything here is in *simulated* seconds; the engine divides by the
time scale when it arms a timer.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

from olb.sim.catalogue import KNOWN_MODELS, ModelSpec

MIB = 1 << 20
GIB = 1 << 30
# Compute-graph overhead of a runner beyond weights and KV cache (llama.cpp's
# graph plus the runner's CUDA context, a few hundred MiB in real logs).
GRAPH_BYTES = 256 * MIB
EMBED_GRAPH_BYTES = 64 * MIB
# With other models resident a new one must fit in this share of the free
# memory or something is evicted first (server/sched.go, load's pre-flight check).
FIT_FRACTION = 0.8
# What a first model that does not fit leaves free when it spills to CPU.
SPILL_HEADROOM = 512 * MIB
# Speed of the CPU share of a spilled model relative to the GPU (a 70B q4 on
# one 24 GB card: ~3-4 tokens/s instead of ~20, as users report).
CPU_FACTOR = 0.1
# NVML's utilisation is the share of a sample period with a kernel running;
# the simulator measures it over this many simulated seconds.
UTIL_WINDOW_S = 1.0

# The anchors of the speed law: the catalogue's 8B and 70B Q4_K_M sizes.
_SIZE_8B = KNOWN_MODELS["llama3.1:8b"].size
_SIZE_70B = KNOWN_MODELS["llama3.1:70b"].size


@dataclass(frozen=True)
class GpuProfile:
    """One GPU model's figures (immutable; `replace` to vary one)."""

    name: str = "default"
    # DCGM's modelName label.
    model_name: str = "olb-sim 80GB GPU"
    # Total framebuffer in bytes.
    vram: int = 80 * GIB
    # Single-stream tokens/s of an 8B and a 70B Q4_K_M model (llama.cpp, see above).
    eval_8b: float = 130.0
    prompt_8b: float = 6000.0
    eval_70b: float = 23.0
    prompt_70b: float = 800.0
    # Per-sequence slowdown in a batch: r(n) = r1 / (1 + alpha (n - 1)).
    alpha: float = 0.15
    # load = load_fixed_s + size / disk_bytes_per_s (see "Loads" above).
    load_fixed_s: float = 0.5
    disk_bytes_per_s: float = 1.75e9
    # VRAM recovery after an unload before the scheduler moves on (server/
    # sched.go, waitForVRAMRecovery: up to 5 s, "typical convergence is 0.5-1.5s").
    unload_s: float = 1.0

    def __post_init__(self):
        if self.vram <= 0:
            raise ValueError("gpu vram must be > 0")
        for f in ("eval_8b", "prompt_8b", "eval_70b", "prompt_70b", "disk_bytes_per_s"):
            if getattr(self, f) <= 0:
                raise ValueError(f"gpu {f} must be > 0")
        for f in ("alpha", "load_fixed_s", "unload_s"):
            if getattr(self, f) < 0:
                raise ValueError(f"gpu {f} must be >= 0")

    def replace(self, **changes) -> "GpuProfile":
        return dataclasses.replace(self, **changes)

    # --- per model ----------------------------------------------------------

    def _law(self, r8: float, r70: float, size: int) -> float:
        x = math.log(max(size, 1) / _SIZE_8B) / math.log(_SIZE_70B / _SIZE_8B)
        return r8 * (r70 / r8) ** x

    def eval_rate(self, spec: ModelSpec) -> float:
        """Single-stream decode tokens/s of `spec` fully in VRAM."""
        return self._law(self.eval_8b, self.eval_70b, spec.size) * spec.speed

    def prompt_rate(self, spec: ModelSpec) -> float:
        """Prefill tokens/s of `spec` fully in VRAM."""
        return self._law(self.prompt_8b, self.prompt_70b, spec.size)

    def load_seconds(self, spec: ModelSpec) -> float:
        return self.load_fixed_s + spec.size / self.disk_bytes_per_s


# GPU-Benchmarks-on-LLM-Inference's table (llama.cpp, LLaMA-3 Q4_K_M).  The 24 GB cards have no
# single-card 70B figure (it does not fit); their 70B anchor is the 2-card
# one, used only for the GPU share of a spilled model.
PROFILES: dict[str, GpuProfile] = {p.name: p for p in (
    GpuProfile(),
    GpuProfile("h100", "NVIDIA H100 PCIe", 81559 * MIB, 144.49, 7760.16, 25.01, 984.06),
    GpuProfile("a100", "NVIDIA A100-SXM4-80GB", 81920 * MIB, 133.38, 5863.92, 24.33, 796.81),
    GpuProfile("a100-pcie", "NVIDIA A100 80GB PCIe", 81920 * MIB, 138.31, 5800.48, 22.11, 726.65),
    GpuProfile("l40s", "NVIDIA L40S", 46068 * MIB, 113.60, 5908.52, 15.31, 649.08),
    GpuProfile("rtx4090", "NVIDIA GeForce RTX 4090", 24564 * MIB, 127.74, 6898.71, 19.06, 905.38),
    GpuProfile("rtx3090", "NVIDIA GeForce RTX 3090", 24576 * MIB, 111.74, 3865.39, 16.29, 393.89),
)}


def gpu_profile(name: str) -> GpuProfile:
    """A built-in profile by name (KeyError lists the known ones)."""
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown gpu profile {name!r}; known: {', '.join(PROFILES)}") from None


def runner_bytes(spec: ModelSpec, num_ctx: int, parallel: int) -> int:
    """Memory of a loaded runner: weights + KV for num_ctx x parallel + graph
    (llm/llama_server.go, startLlamaServer: the runner gets -c num_ctx*parallel)."""
    graph = EMBED_GRAPH_BYTES if spec.embedding_only else GRAPH_BYTES
    ctx = min(num_ctx, spec.context_length)
    return spec.size + spec.kv_bytes_per_token() * ctx * parallel + graph


def spilled_rate(rate: float, on_gpu: float) -> float:
    """Tokens/s of a model with `on_gpu` (0..1) of its bytes in VRAM: the GPU
    share runs at `rate`, the rest at CPU_FACTOR of it, one after the other."""
    if on_gpu >= 1.0:
        return rate
    return 1.0 / (on_gpu / rate + (1.0 - on_gpu) / (rate * CPU_FACTOR))


class Gpu:
    """The runtime state of one simulated GPU.

    Memory: `used` bytes are held by resident, loading and still-recovering
    runners.  Decode: `decoding` maps a runner to its sequences decoding now;
    `step` is the simulated seconds of one decode round, the time between
    two tokens of every sequence on the GPU.  Prefill: `prefilling` jobs
    share the GPU equally; each has `pf_left`, simulated seconds of work it
    would need alone.  Utilisation: busy while anything decodes or prefills.

    Callbacks go to the engine, which owns the timers:
      on_step()              the decode step changed (re-plan non-streamed jobs)
      on_prefilled(job)      a job's prefill work is done
    """

    def __init__(self, profile: GpuProfile, now):
        self.profile = profile
        self.now = now                    # simulated seconds, monotonic
        self.used = 0
        self.decoding: dict = {}          # runner -> sequences decoding
        self.step = 0.0
        self.prefilling: list = []
        self._pf_at = 0.0                 # when pf_left was last settled
        self._busy_since = None           # start of the current busy period
        self._busy: deque[tuple[float, float]] = deque()  # finished busy periods (start, end)

    # --- memory --------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.profile.vram

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)

    # --- decode --------------------------------------------------------------

    def decode_start(self, runner) -> None:
        self.decoding[runner] = self.decoding.get(runner, 0) + 1
        self._restep()

    def decode_stop(self, runner) -> None:
        n = self.decoding[runner] - 1
        if n:
            self.decoding[runner] = n
        else:
            del self.decoding[runner]
        self._restep()

    def _restep(self) -> None:
        alpha = self.profile.alpha
        self.step = sum((1.0 + alpha * (n - 1)) / r.eval_rate for r, n in self.decoding.items())
        self._mark()

    # --- prefill (processor sharing) -------------------------------------------

    def _settle(self) -> None:
        now = self.now()
        n = len(self.prefilling)
        if n:
            share = (now - self._pf_at) / n
            for job in self.prefilling:
                job.pf_left -= share
        self._pf_at = now

    def prefill_add(self, job, work: float) -> None:
        self._settle()
        job.pf_left = work
        self.prefilling.append(job)
        self._mark()

    def prefill_remove(self, job) -> None:
        self._settle()
        self.prefilling.remove(job)
        self._mark()

    def prefill_next(self):
        """(simulated seconds until the first prefill ends, that job), or None."""
        if not self.prefilling:
            return None
        self._settle()
        job = min(self.prefilling, key=lambda j: j.pf_left)
        return max(0.0, job.pf_left) * len(self.prefilling), job

    def prefill_done(self, eps: float = 1e-9) -> list:
        """Remove the jobs whose work is done (or within `eps` of it) and
        return them as (job, the simulated instant its work ended): a timer
        fires at millisecond granularity, the instant is exact."""
        self._settle()
        n = len(self.prefilling)
        now = self._pf_at
        done = [(j, now + j.pf_left * n) for j in self.prefilling if j.pf_left <= eps]
        if done:
            self.prefilling = [j for j in self.prefilling if j.pf_left > eps]
            self._mark()
        return done

    # --- utilisation ---------------------------------------------------------------

    def _mark(self) -> None:
        busy = bool(self.decoding) or bool(self.prefilling)
        now = self.now()
        if busy and self._busy_since is None:
            self._busy_since = now
        elif not busy and self._busy_since is not None:
            self._busy.append((self._busy_since, now))
            self._busy_since = None
            self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - UTIL_WINDOW_S
        while self._busy and self._busy[0][1] <= horizon:
            self._busy.popleft()

    def utilisation(self) -> int:
        """Percent of the last UTIL_WINDOW_S with a kernel running (NVML's
        definition), an integer like DCGM prints it."""
        now = self.now()
        self._trim(now)
        start = now - UTIL_WINDOW_S
        busy = sum(min(e, now) - max(s, start) for s, e in self._busy if e > start)
        if self._busy_since is not None:
            busy += now - max(self._busy_since, start)
        return max(0, min(100, round(100.0 * busy / UTIL_WINDOW_S)))


# --- the DCGM exporter's text -------------------------------------------------------

# dcgm-exporter's default-counters.csv help texts and its label order.
_DCGM_FIELDS = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)."),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)."),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)."),
)
DCGM_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"   # promhttp's text format


def dcgm_text(gpu: Gpu, uuid: str, hostname: str, index: int = 0) -> bytes:
    """The three gauges dcgm-exporter serves on :9400/metrics, for one GPU:
    HELP/TYPE lines, then `NAME{gpu="0",UUID=...,device="nvidia0",
    modelName=...,Hostname=...} value`, memory in MiB."""
    used = min(gpu.used, gpu.total) // MIB
    free = gpu.total // MIB - used
    values = (gpu.utilisation(), free, used)
    labels = (f'gpu="{index}",UUID="{uuid}",pci_bus_id="00000000:{index + 1:02X}:00.0",'
              f'device="nvidia{index}",modelName="{_label(gpu.profile.model_name)}",'
              f'Hostname="{_label(hostname)}"')
    out = []
    for (name, help_text), value in zip(_DCGM_FIELDS, values, strict=True):
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n")
    return "".join(out).encode()


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
