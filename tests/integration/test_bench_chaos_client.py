"""bench/chaos.py's client over real sockets: what it reads from olb in front of
simulated Ollama instances ends in the class the bench reports."""

import orjson

from bench import chaos
from olb.sim import SimConfig

from harness import run, start_cluster


def _body(stream: bool) -> bytes:
    return orjson.dumps({"model": "llama3.2", "prompt": "x", "stream": stream, "options": {"num_predict": 8}})


def test_chaos_client_classes(loop):
    async def main():
        good = await start_cluster(1, models_interval=0)
        failing = await start_cluster(1, SimConfig(token_rate=0, ttft=0, seed=7, error_after_tokens=3),
                                      models_interval=0)
        try:
            got = [await chaos.one("127.0.0.1", good.port, "/api/generate", _body(s), s, 10) for s in (True, False)]
            got.append(await chaos.one("127.0.0.1", failing.port, "/api/generate", _body(True), True, 10))
            await good.sims[0].close()  # nothing behind olb: 502 before any byte
            got.append(await chaos.one("127.0.0.1", good.port, "/api/generate", _body(True), True, 10))
            return got
        finally:
            await good.close()
            await failing.close()

    assert run(loop, main()) == ["completed", "completed", "inband_error", "clean_error"]
