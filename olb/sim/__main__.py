"""olb-sim: serve simulated Ollama instances until SIGINT/SIGTERM.

    olb-sim --port 11435 --count 3 --parallel 4 --token-rate 130

prints one line per instance, its URL (http://127.0.0.1:11435, ...:11436,
...) on stdout, in port order, flushed, so scripts and tests can read the
URLs without sleeping.  Exit status: 0 after a signal, 2 for bad flags, 1 if
a port cannot be bound.

--parallel defaults to 4 here, not Ollama's 1 (SimConfig's default), so a
demo cluster shows concurrency; pass --parallel 1 for Ollama's behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys

import uvloop

from olb.sim.catalogue import KNOWN_MODELS, normalize_name
from olb.sim.config import DEFAULT_MODELS, SimConfig
from olb.sim.gojson import DecodeError, parse_go_duration
from olb.sim.gpu import GIB, PROFILES
from olb.sim.server import start_cluster

CLI_PARALLEL = 4


def _duration(text: str) -> float:
    """Seconds, or a Go duration like 5m (as OLLAMA_KEEP_ALIVE)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return parse_go_duration(text)
    except DecodeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _models(text: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in KNOWN_MODELS:
            raise argparse.ArgumentTypeError(f"unknown model {n!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return names


def _preload(text: str) -> tuple:
    """Model names in any spelling Ollama accepts (llama3.2 = llama3.2:latest)."""
    names = []
    for n in (n.strip() for n in text.split(",")):
        if n:
            full = normalize_name(n)
            if full is None:
                raise argparse.ArgumentTypeError(f"invalid model name {n!r}")
            names.append(full)
    return tuple(names)


def build_parser() -> argparse.ArgumentParser:
    d = SimConfig()
    p = argparse.ArgumentParser(prog="olb-sim", description="Simulated Ollama instances (no GPU).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument("--port", type=int, default=11435,
                   help="first port; instances use consecutive ports; 0 = ephemeral (default %(default)s)")
    p.add_argument("--count", type=int, default=1, help="instances to serve (default %(default)s)")
    p.add_argument("--parallel", type=int, default=CLI_PARALLEL,
                   help="slots per loaded model, OLLAMA_NUM_PARALLEL (default %(default)s; Ollama's is 1)")
    p.add_argument("--embed-parallel", type=int, default=d.embed_parallel,
                   help="slots of embedding models (default %(default)s, as Ollama)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests that may wait for a slot before 503 (default %(default)s)")
    p.add_argument("--token-rate", type=float, default=d.token_rate,
                   help="tokens/s per request, 0 = as fast as possible (default %(default)s)")
    p.add_argument("--ttft", type=float, default=d.ttft, help="time to first token, s (default %(default)s)")
    p.add_argument("--prompt-rate", type=float, default=d.prompt_rate,
                   help="prompt tokens/s added to ttft, 0 = free (default %(default)s)")
    p.add_argument("--parallel-slowdown", type=float, default=d.parallel_slowdown,
                   help="alpha in rate/(1+alpha(n-1)) with n decoding (default %(default)s)")
    p.add_argument("--num-predict", type=int, default=d.num_predict_default,
                   help="tokens when a request sets no limit (default %(default)s)")
    p.add_argument("--num-ctx", type=int, default=d.num_ctx, help="per-slot context (default %(default)s)")
    p.add_argument("--keep-alive", type=_duration, default=d.keep_alive,
                   help="seconds or Go duration (default 5m)")
    p.add_argument("--seed", type=int, default=d.seed, help="text generator seed (default %(default)s)")
    p.add_argument("--version", dest="ollama_version", default=d.version,
                   help="version to report (default %(default)s)")
    p.add_argument("--models", type=_models, default=DEFAULT_MODELS,
                   help="comma-separated installed models (default: " + ",".join(DEFAULT_MODELS) + ")")
    p.add_argument("--no-host-check", action="store_true", help="accept any Host header")
    p.add_argument("--deterministic-time", action="store_true",
                   help="fixed timestamps and nominal durations")
    p.add_argument("--fragment", type=int, default=0, help="write responses in pieces of N bytes")
    p.add_argument("--fail-after-tokens", type=int, default=None, help="drop the connection after N tokens")
    p.add_argument("--error-after-tokens", type=int, default=None, help="in-band error after N tokens")
    g = p.add_argument_group("simulated GPU (off unless --gpu is given)")
    g.add_argument("--gpu", choices=sorted(PROFILES), default=None,
                   help="GPU profile: loads, VRAM, eviction, pending queue, speeds (llama.cpp figures)")
    g.add_argument("--vram", type=float, default=None, help="GPU memory in GiB (default: the profile's)")
    g.add_argument("--load-fixed", type=float, default=None,
                   help="seconds of every load before reading weights (default: the profile's, 0.5)")
    g.add_argument("--disk-speed", type=float, default=None,
                   help="weights read speed in GB/s (default: the profile's, 1.75)")
    g.add_argument("--max-loaded", type=int, default=d.max_loaded_models,
                   help="resident models at most, OLLAMA_MAX_LOADED_MODELS (default 0 = 3 per GPU)")
    g.add_argument("--slot-queue", type=int, default=None,
                   help="requests waiting for a slot before 503 (default: unbounded with --gpu, "
                        "--max-queue without)")
    g.add_argument("--no-prefix-cache", action="store_true", help="no per-slot prompt cache")
    g.add_argument("--preload", type=_preload, default=(),
                   help="comma-separated installed models resident (idle) at start")
    p.add_argument("--time-scale", type=float, default=d.time_scale,
                   help="simulated seconds per real second (default %(default)s)")
    return p


def _gpu(args):
    if args.gpu is None:
        for flag in ("vram", "load_fixed", "disk_speed"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --gpu")
        return None
    profile = PROFILES[args.gpu]
    changes = {}
    if args.vram is not None:
        changes["vram"] = int(args.vram * GIB)
    if args.load_fixed is not None:
        changes["load_fixed_s"] = args.load_fixed
    if args.disk_speed is not None:
        changes["disk_bytes_per_s"] = args.disk_speed * 1e9
    return profile.replace(**changes) if changes else profile


def config_from_args(args) -> SimConfig:
    return SimConfig(
        models=args.models, num_parallel=args.parallel, embed_parallel=args.embed_parallel,
        max_queue=args.max_queue, token_rate=args.token_rate, ttft=args.ttft,
        prompt_rate=args.prompt_rate, parallel_slowdown=args.parallel_slowdown,
        num_predict_default=args.num_predict, num_ctx=args.num_ctx, keep_alive=args.keep_alive,
        seed=args.seed, version=args.ollama_version, host_check=not args.no_host_check,
        deterministic_time=args.deterministic_time, fragment=args.fragment,
        fail_after_tokens=args.fail_after_tokens, error_after_tokens=args.error_after_tokens,
        gpu=_gpu(args), max_loaded_models=args.max_loaded, slot_queue=args.slot_queue,
        prefix_cache=not args.no_prefix_cache, preload=args.preload, time_scale=args.time_scale,
    )


async def serve(config: SimConfig, host: str, port: int, count: int) -> int:
    try:
        servers = await start_cluster(count, config, host, port)
    except OSError as exc:
        print(f"olb-sim: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gc.freeze()  # as olb's workers do: start-up objects out of the collector's sight
    for s in servers:
        print(s.url, flush=True)
    if config.gpu is None:
        speed = f"{config.token_rate:g} tokens/s, ttft {config.ttft:g}s"
    else:
        speed = f"gpu {config.gpu.name} {config.gpu.vram / GIB:g} GiB"  # type: ignore[union-attr]  # a name became its profile
    scale = f", time scale {config.time_scale:g}" if config.time_scale != 1 else ""
    print(f"olb-sim: {count} instance(s), parallel {config.num_parallel}, {speed}{scale}",
          file=sys.stderr, flush=True)
    await stop.wait()
    for s in servers:
        await s.close()
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be >= 1")
    if not 0 <= args.port <= 65535 or (args.port and args.port + args.count - 1 > 65535):
        parser.error("--port out of range")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    return uvloop.run(serve(config, args.host, args.port, args.count))


if __name__ == "__main__":
    sys.exit(main())
