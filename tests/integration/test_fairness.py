"""Fair queuing over real sockets: a flood from one client does not delay
another's request; batch yields to interactive; a full queue is shared."""

import asyncio

from olb.sim import SimConfig

from harness import RawClient, run, start_cluster

# One backend, one request at a time, each ~0.1 s: the queue decides the order.
SLOW = SimConfig(token_rate=100, ttft=0, seed=5, num_predict_default=10, num_parallel=1)



async def send_all(cluster, specs):
    """Open one connection per (name, headers) and send a request on each,
    each only once olb has taken the previous one in (admitted, queued or
    refused), so arrival order is exact; returns (name, status) in
    completion order."""
    clients = []
    proxy = cluster.proxy
    for i, (name, headers) in enumerate(specs):
        c = await RawClient.connect(cluster.port)
        c.send("POST", "/api/generate", {"model": "llama3.2", "prompt": name, "stream": False}, headers)
        clients.append((name, c))
        # Bounded by time, not by a count of polls: on a loaded machine
        # 1,000 polls of 1 ms passed before olb had read the request, and the
        # next one overtook it.
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline:
            seen = proxy.balancer.table.inflight(0) + len(proxy.balancer.queue) + proxy.balancer.rejected
            if seen >= i + 1:
                break
            await asyncio.sleep(0.001)
    done = []

    async def wait(name, c):
        r = await c.response(timeout=30)
        done.append((name, r.status))
        c.close()

    await asyncio.gather(*(wait(n, c) for n, c in clients))
    return done


def test_flood_from_one_client_does_not_starve_another(loop):
    async def main():
        cluster = await start_cluster(1, SLOW, max_inflight=1, models_interval=0, session_bound=0)
        try:
            flood = [(f"heavy{i}", {"Authorization": "Bearer heavy"}) for i in range(12)]
            return await send_all(cluster, flood + [("light", {"Authorization": "Bearer light"})])
        finally:
            await cluster.close()

    done = run(loop, main(), 60)
    names = [n for n, _ in done]
    assert all(status == 200 for _, status in done)
    # Arrived last behind 12; served within the first three.
    assert names.index("light") <= 2, names


def test_batch_yields_to_interactive(loop):
    async def main():
        cluster = await start_cluster(1, SLOW, max_inflight=1, models_interval=0, session_bound=0)
        try:
            batch = [(f"batch{i}", {"X-Priority": "batch", "Authorization": f"Bearer b{i}"}) for i in range(6)]
            interactive = [(f"chat{i}", {"Authorization": f"Bearer c{i}"}) for i in range(3)]
            return await send_all(cluster, batch + interactive)
        finally:
            await cluster.close()

    names = [n for n, _ in run(loop, main(), 60)]
    # batch0 was admitted at once (nothing waited); after it, the three
    # interactive requests overtake the five batch ones still queued.
    assert names[0] == "batch0"
    assert set(names[1:4]) == {"chat0", "chat1", "chat2"}, names


def test_full_queue_sheds_the_heaviest_client(loop):
    async def main():
        cluster = await start_cluster(1, SLOW, max_inflight=1, models_interval=0, session_bound=0,
                                      queue_size=4)
        try:
            flood = [(f"heavy{i}", {"Authorization": "Bearer heavy"}) for i in range(5)]
            return await send_all(cluster, flood + [("light", {"Authorization": "Bearer light"})])
        finally:
            await cluster.close()

    done = dict(run(loop, main(), 60))
    # heavy0 runs, heavy1-4 fill the queue; light takes heavy4's place.
    assert done["light"] == 200
    assert done["heavy4"] == 429
    assert [done[f"heavy{i}"] for i in range(4)] == [200] * 4


def test_client_over_its_fixed_share_gets_429(loop):
    async def main():
        cluster = await start_cluster(1, SLOW, max_inflight=1, models_interval=0, session_bound=0,
                                      client_queue=2, client_header="x-team")
        try:
            flood = [(f"t{i}", {"X-Team": "ml"}) for i in range(4)]
            return await send_all(cluster, flood + [("other", {"X-Team": "web"})])
        finally:
            await cluster.close()

    done = dict(run(loop, main(), 60))
    assert [done[f"t{i}"] for i in range(4)] == [200, 200, 200, 429]
    assert done["other"] == 200
