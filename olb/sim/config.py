"""SimConfig: every knob of the simulated Ollama, with its default and why.

Defaults follow Ollama's envconfig/config.go for the scheduler
(OLLAMA_NUM_PARALLEL=1 since v0.9.7, OLLAMA_MAX_QUEUE=512, OLLAMA_KEEP_ALIVE=5m
in KeepAlive) and llama.cpp's measured single-stream speed for decode (8B q4
~130 tokens/s on a 4090/A100/H100-class card; gpu.py says where from).  The
`olb-sim` command exposes each field as a flag (see olb/sim/__main__.py);
its --parallel default is 4, not 1, because a demo cluster with one slot per
instance is dull -- the Python default stays Ollama's.

Everything the GPU model added is opt-in: with `gpu` None and `time_scale` 1
an instance behaves exactly as before (instant loads, the slot-wait 503).
gpu.py's docstring names the sources of a GPU profile's figures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from olb.sim.catalogue import parse_name
from olb.sim.gpu import GpuProfile, gpu_profile

# The installed models of a fresh instance: a realistic small workstation set
# (sizes as /api/tags reports them, see catalogue.py), one of each kind a balancer must route: small/medium chat
# models, an embedding-only model and one 70B.
DEFAULT_MODELS = (
    "llama3.2:latest",
    "llama3.1:8b",
    "qwen2.5:7b",
    "mistral:latest",
    "nomic-embed-text:latest",
    "llama3.1:70b",
)

# What a crashing runner reports in band (server/routes.go, streamResponse: errors after
# streaming began keep status 200 and end the stream with an {"error": ...} line).
DEFAULT_ERROR_MESSAGE = "an error was encountered while running the model: unexpected EOF"


@dataclass(frozen=True)
class SimConfig:
    """Knobs of one simulated Ollama instance (immutable; use `replace`).

    Timing model per inference request: wait for a slot (FIFO: the semaphore
    llm/llama_server.go's Completion acquires) -> prefill for `ttft` (+ prompt
    tokens / `prompt_rate`) -> the first token -> one token every
    1/`token_rate` s -> the final `done` object right after the last token.
    """

    # Catalogue: names of installed models (see catalogue.KNOWN_MODELS) or
    # catalogue.ModelSpec objects for custom ones.
    models: tuple = DEFAULT_MODELS
    # Parallel slots per loaded model (OLLAMA_NUM_PARALLEL; 1 since v0.9.7).
    num_parallel: int = 1
    # Slots of embedding-only models: Ollama forces 1 (server/sched.go, load).
    embed_parallel: int = 1
    # OLLAMA_MAX_QUEUE: one more waiting request gets 503 "server busy".
    # With a gpu it bounds the scheduler's pending queue (requests waiting
    # for a model to load), as in Ollama; without one, loads are instant and
    # it bounds the wait for a slot instead (see slot_queue).
    max_queue: int = 512
    # Decode speed in tokens/s per request; 0 = as fast as possible.
    token_rate: float = 130.0
    # Time to first token (prefill) in seconds.
    ttft: float = 0.05
    # Prompt processing in tokens/s added to ttft; 0 = prompt length is free.
    prompt_rate: float = 0.0
    # Per-request slowdown alpha with n requests decoding on one model:
    # rate(n) = token_rate / (1 + alpha * (n - 1)) (~0.15 for real llama.cpp
    # builds, fitted to llama.cpp PR #16894's batched-bench figures).
    # 0 = every slot decodes at the full rate.
    parallel_slowdown: float = 0.0
    # Tokens generated when a request sets no options.num_predict/max_tokens;
    # the stream then ends with done_reason "stop".  With a limit it ends
    # with "length" after exactly that many tokens.
    num_predict_default: int = 64
    # Per-slot context length reported by /api/ps (OLLAMA_CONTEXT_LENGTH).
    num_ctx: int = 4096
    # Default keep-alive of a loaded model in seconds (OLLAMA_KEEP_ALIVE=5m).
    keep_alive: float = 300.0
    # Seed of the text generator: same seed + same request = same text.
    seed: int = 0
    # Reported by /api/version; also selects version-dependent error texts
    # (server/routes.go: GenerateHandler's 404 quoting changed in v0.4.0, ChatHandler's in v0.12.0).
    version: str = "0.12.6"
    # Ollama's Host check when bound to a loopback address (server/routes.go, allowedHostsMiddleware).
    host_check: bool = True
    # Fixed created_at/expires_at and nominal (not measured) durations, so two
    # fetches of the same request are byte-identical.
    deterministic_time: bool = False
    # --- test-only faults -------------------------------------------------
    # Write every response in pieces of at most this many bytes (0 = off).
    fragment: int = 0
    # Abort the TCP connection after this many tokens (None = off).
    fail_after_tokens: int | None = None
    # After this many tokens emit an in-band error and end the stream.
    error_after_tokens: int | None = None
    error_message: str = DEFAULT_ERROR_MESSAGE
    # --- the simulated GPU -------------------------------------------------
    # None: no GPU -- instant loads, no memory, the speed knobs above.  A
    # gpu.GpuProfile or the name of one (gpu.PROFILES: "default", "h100",
    # "a100", "a100-pcie", "l40s", "rtx4090", "rtx3090"): Ollama's scheduler
    # with loads, eviction and the pending queue; speeds come from the
    # profile, and token_rate, ttft, prompt_rate and parallel_slowdown are
    # not used.  See engine.py and gpu.py.
    gpu: GpuProfile | str | None = None
    # Resident models at most (OLLAMA_MAX_LOADED_MODELS); 0 = 3 per GPU.
    # Only with a gpu.
    max_loaded_models: int = 0
    # Requests that may wait for a slot of a loaded model before 503; None =
    # max_queue without a gpu (the simulator's old bound), unbounded with one
    # (Ollama's slot semaphore has no limit).
    slot_queue: int | None = None
    # Per-slot prompt cache: a request whose prompt starts like what a free
    # slot holds prefills only the rest.  Only with a gpu.
    prefix_cache: bool = True
    # Models resident (loaded, idle) when the instance starts: names or
    # ModelSpecs among `models`.
    preload: tuple = ()
    # Simulated seconds per real second: every duration (ttft, tokens,
    # loads, keep-alive) runs this much faster; reported durations stay in
    # simulated ns.
    time_scale: float = 1.0

    def __post_init__(self):
        if isinstance(self.gpu, str):
            try:
                object.__setattr__(self, "gpu", gpu_profile(self.gpu))
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        if self.gpu is not None and not isinstance(self.gpu, GpuProfile):
            raise ValueError("gpu must be a GpuProfile, a profile name or None")
        installed = {_model_key(m) for m in self.models}
        for m in self.preload:
            if _model_key(m) not in installed:
                raise ValueError(f"preload model {m!r} is not among the installed models")
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if self.max_loaded_models < 0:
            raise ValueError("max_loaded_models must be >= 0")
        if self.slot_queue is not None and self.slot_queue < 0:
            raise ValueError("slot_queue must be >= 0 or None")
        for name in ("num_parallel", "embed_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_queue", "token_rate", "ttft", "prompt_rate",
                     "parallel_slowdown", "num_predict_default", "fragment",
                     "keep_alive"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.num_ctx < 1:
            raise ValueError("num_ctx must be >= 1")
        for name in ("fail_after_tokens", "error_after_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")

    def replace(self, **changes) -> "SimConfig":
        """A copy with some fields changed (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)


def _model_key(model) -> str | None:
    name = parse_name(model if isinstance(model, str) else getattr(model, "name", ""))
    return name.key if name is not None else None
