"""A reload in process (olb/lifecycle.py Lifecycle.swap): a backend kept across it
keeps its capacity while requests of the old configuration still run there."""

from harness import RawClient, proxy_config, run, start_cluster, until

from olb.lifecycle import Lifecycle
from olb.sim import SimConfig

STREAM = {"model": "llama3.2", "prompt": "tell me a story", "options": {"num_predict": 40}}


def test_a_backend_kept_across_a_reload_keeps_its_capacity(loop):
    async def main():
        cluster = await start_cluster(1, SimConfig(token_rate=50, ttft=0, seed=1, num_parallel=4),
                                      max_inflight=1, policy="least-inflight")
        proxy = cluster.proxy
        url = cluster.sims[0].url
        first = second = None
        try:
            old = proxy.balancer
            first = await RawClient.connect(proxy.port)
            first.send("POST", "/api/generate", STREAM)
            await until(lambda: old.table.inflight(0) == 1)

            life = Lifecycle(proxy)
            life.swap(proxy_config([url], max_inflight=1, policy="least-inflight", queue_timeout=20))
            new = proxy.balancer
            assert new is not old and proxy.ctx.config.queue_timeout == 20
            # The new table holds the running request's slot: max=1 still holds.
            assert new.table.inflight(0) == 1 and old.handoff == {0: [new, 0, 1]}

            second = await RawClient.connect(proxy.port)
            second.send("POST", "/api/generate", {**STREAM, "stream": False})
            await until(lambda: len(new.queue) == 1)
            assert new.table.inflight(0) == 1

            # The old request ends: its carried slot goes to the one queued.
            streamed = await first.response(timeout=20)
            assert streamed.status == 200 and streamed.lines()[-1]["done"] is True
            answered = await second.response(timeout=20)
            assert answered.status == 200 and answered.json()["done"] is True
            assert old.handoff == {}
            await until(lambda: not life.retiring)
            # Served there since the reload: the carried request and the new one.
            assert new.table.inflight(0) == 0 and new.table.served(0) == 2
        finally:
            for c in (first, second):
                if c is not None:
                    c.close()
            await cluster.close()

    run(loop, main(), timeout=60)
