"""olb.sim: a faithful simulated Ollama (no GPU) for olb's tests, demo and benchmarks.

    olb/sim/config.py     SimConfig: the knobs and their defaults
    olb/sim/catalogue.py  installed models, blobs and layers, name normalisation (llama3.2 -> llama3.2:latest)
    olb/sim/gguf.py       GGUF header key/values (what /api/create reads from an uploaded blob)
    olb/sim/tokens.py     deterministic text, prompt token counts
    olb/sim/engine.py     Ollama's scheduler: pending queue, loads, eviction, keep-alive, slots, timing
    olb/sim/gpu.py        the simulated GPU: profiles, memory, speeds, sharing, DCGM /metrics text
    olb/sim/api.py        handlers: validation, Ollama's error texts, response bodies
    olb/sim/gojson.py     Go's JSON: encoding quirks, decoder error texts, durations
    olb/sim/clock.py      timestamps in Go's formats, real or frozen
    olb/sim/server.py     asyncio.Protocol + h11: keep-alive, pipelining, flow control
    olb/sim/__main__.py   the `olb-sim` command

    server = await start_sim(SimConfig(token_rate=0))    # http://127.0.0.1:<port>
    ...
    await server.close()
"""

from olb.sim.config import SimConfig
from olb.sim.server import SimServer, SimStats, start_cluster, start_sim

__all__ = ["SimConfig", "SimServer", "SimStats", "start_cluster", "start_sim"]
