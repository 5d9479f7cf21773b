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


def test_a_kept_backend_keeps_its_drain_flag_at_its_new_index(loop):
    async def main():
        cluster = await start_cluster(2, max_inflight=2, policy="least-inflight")
        proxy = cluster.proxy
        a, b = (s.url for s in cluster.sims)
        try:
            proxy.balancer.drain(0, True)
            life = Lifecycle(proxy)
            # Both kept, in another order and with another capacity: a's
            # drain flag follows it to its new index.
            life.swap(proxy_config([b, a], max_inflight=3, policy="least-inflight"))
            new = proxy.balancer
            assert [x.url for x in new.backends] == [b, a]
            assert list(new.drained) == [0, 1] and not new.table.is_healthy(1)
            assert [new.table.snapshot()[i]["capacity"] for i in (0, 1)] == [3, 3]
            client = await RawClient.connect(proxy.port)
            try:
                for _ in range(3):
                    r = await client.request("POST", "/api/generate",
                                             {"model": "llama3.2", "prompt": "hi", "stream": False})
                    assert r.status == 200
            finally:
                client.close()
            assert (new.table.served(0), new.table.served(1)) == (3, 0)
            await until(lambda: not life.retiring)
        finally:
            await cluster.close()

    run(loop, main(), timeout=60)
