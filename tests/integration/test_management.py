"""Model management across the cluster, through the official `ollama` client over real sockets.

Three olb-sim backends holding different models; olb must answer as one
Ollama would (docs/management.md).
"""

import asyncio
import hashlib
import socket

import httpx
import ollama
import pytest

from olb.server import start_proxy
from olb.sim import SimConfig, gguf, start_sim

from harness import RawClient, proxy_config

BASE = SimConfig(token_rate=0, ttft=0, seed=3)
#: GGUF metadata of a small llama, enough for the sim's /api/create (its ggml.Decode).
KV = {"general.architecture": "llama", "general.parameter_count": 1_235_814_432, "general.file_type": 7,
      "llama.context_length": 8192, "llama.block_count": 16, "llama.embedding_length": 2048}
MODELS = (("llama3.2:1b",), ("qwen2.5:0.5b",), ("all-minilm:latest",))


class Cluster:
    def __init__(self, proxy, sims, extra=()):
        self.proxy = proxy
        self.sims = sims
        self.extra = list(extra)
        self.url = f"http://127.0.0.1:{proxy.port}"
        self.admin_url = f"http://127.0.0.1:{proxy.admin_port}"

    def have_blob(self, digest):
        return [s.api.catalogue.blob(digest) is not None for s in self.sims]

    def installed(self, model):
        """Which sims have `model` installed (by display name)."""
        return [any(e.name.display == model for e in s.api.catalogue.installed.values()) for s in self.sims]

    async def close(self):
        await self.proxy.close()
        for s in self.sims:
            await s.close()
        for srv in self.extra:
            srv.close()
            await srv.wait_closed()


async def start(models=MODELS, extra_backends=(), **overrides):
    sims = [await start_sim(BASE.replace(models=m)) for m in models]
    overrides.setdefault("models_interval", 60)  # only management re-reads catalogues here
    proxy = await start_proxy(proxy_config([s.url for s in sims] + list(extra_backends), **overrides))
    await proxy.balancer.models.refresh_all()
    return proxy, sims


@pytest.fixture
def cluster(loop_thread):
    proxy, sims = loop_thread.run(start())
    c = Cluster(proxy, sims)
    try:
        yield c
    finally:
        loop_thread.run(c.close())


@pytest.fixture
def client(cluster):
    with ollama.Client(host=cluster.url) as c:
        yield c


def direct(sim, method, *args, **kwargs):
    """Call the ollama client's `method` on one sim directly, behind olb's back."""
    with ollama.Client(host=sim.url) as c:
        return getattr(c, method)(*args, **kwargs)


def tags(client):
    return sorted(m.model for m in client.list().models)


def test_pull_then_generate_at_once(cluster, client):
    assert cluster.installed("llama3.1:8b") == [False, False, False]
    assert client.pull("llama3.1:8b").status == "success"
    assert cluster.installed("llama3.1:8b") == [True, True, True]
    # Routable at once: the catalogue was re-read before "success" went out
    # (OLB_MODELS_INTERVAL is 60 s here).
    for _ in range(6):
        assert client.generate(model="llama3.1:8b", prompt="hi", options={"num_predict": 2}).done
    assert "llama3.1:8b" in tags(client)


def test_pull_streams_one_merged_progress(cluster, client):
    lines = list(client.pull("mistral", stream=True))
    assert lines[0].status == "pulling manifest"
    assert [p.status for p in lines].count("pulling manifest") == 1
    assert lines[-1].status == "success" and [p.status for p in lines].count("success") == 1
    layer = [p for p in lines if p.digest]
    size = 4372824384  # mistral:latest in the sim's catalogue, on each of three backends
    assert max(p.total for p in layer) == 3 * size
    assert layer[-1].completed == 3 * size
    assert cluster.installed("mistral:latest") == [True, True, True]


def test_pull_unknown_model_is_ollamas_own_error(cluster, client):
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("no-such-model")
    # Every backend said the same: passed on as one Ollama says it.
    assert err.value.status_code == 500
    assert err.value.error == "pull model manifest: file does not exist"


FULL_DISK = b'{"status":"pulling manifest"}\n{"error":"write /models/blobs: no space left on device"}\n'


async def _failing_backend(pull_answer=FULL_DISK):
    """An Ollama-like backend whose pulls answer `pull_answer` (by default they fail in-band: a full disk)."""

    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                path = head.split(b" ")[1]
                if path in (b"/api/tags", b"/api/ps"):
                    body = b'{"models":[]}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json; charset=utf-8\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(pull_answer), pull_answer))
                await writer.drain()
                if b"connection: close" in head.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("stream", [False, True])
def test_pull_failing_on_one_backend_names_it(loop_thread, stream):
    server, url = loop_thread.run(_failing_backend())
    proxy, sims = loop_thread.run(start(extra_backends=[url]))
    c = Cluster(proxy, sims, [server])
    try:
        with ollama.Client(host=c.url) as client, pytest.raises(ollama.ResponseError) as err:
            if stream:
                list(client.pull("llama3.1:8b", stream=True))
            else:
                client.pull("llama3.1:8b")
        text = err.value.error
        assert url in text and "no space left on device" in text
        assert "pull failed on 1 of 4 backends" in text and "succeeded on the other 3" in text
        assert all(s.url not in text for s in sims)
        assert err.value.status_code == (-1 if stream else 500)
        assert c.installed("llama3.1:8b") == [True, True, True]
    finally:
        loop_thread.run(c.close())


def test_a_long_progress_stream_is_read_as_it_comes(loop_thread):
    # 12,000 layer lines (~1.3 MB): more than any whole answer olb keeps (MAX_ANSWER).
    line = b'{"status":"pulling 0123456789ab","digest":"sha256:0123456789ab","total":1000,"completed":%d}\n'
    answer = b"".join(line % (i // 12) for i in range(12_000)) + b'{"status":"success"}\n'
    server, url = loop_thread.run(_failing_backend(answer))
    proxy, sims = loop_thread.run(start(models=MODELS[:1], extra_backends=[url]))
    c = Cluster(proxy, sims, [server])
    try:
        with ollama.Client(host=c.url) as client:
            lines = list(client.pull("llama3.2:1b", stream=True))
        assert lines[-1].status == "success"
        mine = [p for p in lines if p.digest == "sha256:0123456789ab"]
        assert mine and mine[-1].completed == 999 and mine[-1].total == 1000
    finally:
        loop_thread.run(c.close())


def test_create_from_a_blob_ten_of_ten_times(cluster, client, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf.write(KV) + bytes(range(256)) * 512)
    digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    for i in range(10):
        assert client.create_blob(path) == digest
        done = client.create(model=f"mine{i}", files={"model.gguf": digest})
        assert done.status == "success"
        # Every backend got the blob, so every backend created the model.
        assert cluster.installed(f"mine{i}:latest") == [True, True, True]
        assert client.generate(model=f"mine{i}", prompt="hi", options={"num_predict": 1}).done
    assert cluster.have_blob(digest) == [True, True, True]
    assert [f"mine{i}:latest" for i in range(10)] == sorted(m for m in tags(client) if m.startswith("mine"))


def test_create_from_a_base_model_goes_where_the_base_is(cluster, client):
    assert client.create(model="tuned", from_="qwen2.5:0.5b", system="be brief").status == "success"
    assert cluster.installed("tuned:latest") == [False, True, False]
    assert client.generate(model="tuned", prompt="hi", options={"num_predict": 1}).done


def test_create_streams_merged_progress(cluster, client, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf.write(KV) + b"streamed")
    digest = client.create_blob(path)
    lines = [p.status for p in client.create(model="streamed", files={"m.gguf": digest}, stream=True)]
    assert lines[0] == "parsing GGUF" and lines.count("parsing GGUF") == 1
    assert lines[-1] == "success" and lines.count("success") == 1


def test_delete_removes_the_model_from_tags(cluster, client):
    assert "llama3.2:1b" in tags(client)
    assert client.delete("llama3.2:1b").status == "success"
    assert "llama3.2:1b" not in tags(client)
    assert cluster.installed("llama3.2:1b") == [False, False, False]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("llama3.2:1b")
    assert err.value.status_code == 404 and err.value.error == "model 'llama3.2:1b' not found"
    # Routing knows at once: Ollama's own 404 for a generate.
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="llama3.2:1b", prompt="hi")
    assert err.value.status_code == 404


def test_delete_a_model_held_by_several_backends(cluster, client):
    client.pull("qwen2.5:7b")
    assert cluster.installed("qwen2.5:7b") == [True, True, True]
    client.delete("qwen2.5:7b")
    assert cluster.installed("qwen2.5:7b") == [False, False, False]
    assert "qwen2.5:7b" not in tags(client)


def test_copy(cluster, client):
    assert client.copy("all-minilm", "minilm-copy").status == "success"
    assert cluster.installed("minilm-copy:latest") == [False, False, True]
    assert "minilm-copy:latest" in tags(client)
    assert len(client.embed(model="minilm-copy", input="hello").embeddings) == 1
    with pytest.raises(ollama.ResponseError) as err:
        client.copy("nothing-here", "x")
    assert err.value.status_code == 404 and err.value.error == 'model "nothing-here" not found'


def test_stop_unloads_every_copy(cluster, client):
    client.pull("llama3.2:latest")
    # Load it on each backend directly, behind olb's back.
    for sim in cluster.sims:
        assert direct(sim, "generate", model="llama3.2", prompt="x", options={"num_predict": 1}).done
    loaded = [[m.model for m in direct(s, "ps").models] for s in cluster.sims]
    assert all("llama3.2:latest" in names for names in loaded)
    # `ollama stop llama3.2`: generate with no prompt and keep_alive 0.
    reply = client.generate(model="llama3.2", keep_alive=0)
    assert reply.done_reason == "unload"
    loaded = [[m.model for m in direct(s, "ps").models] for s in cluster.sims]
    assert all("llama3.2:latest" not in names for names in loaded)
    assert "llama3.2:latest" not in [m.model for m in client.ps().models]
    # The chat form (`messages` empty) too.
    direct(cluster.sims[0], "chat", model="llama3.2:1b", messages=[{"role": "user", "content": "x"}],
           options={"num_predict": 1})
    assert client.chat(model="llama3.2:1b", messages=[], keep_alive=0).done_reason == "unload"
    assert "llama3.2:1b" not in [m.model for m in direct(cluster.sims[0], "ps").models]


def test_push_goes_to_one_backend_that_holds_the_model(cluster, client):
    lines = list(client.push("qwen2.5:0.5b", stream=True))
    assert lines[0].status == "retrieving manifest" and lines[-1].status == "success"
    pushes = [s.stats.by_path.get("/api/push", 0) for s in cluster.sims]
    assert pushes == [0, 1, 0]


def _blob(n):
    data = (b"weights" * (n // 7 + 1))[:n]
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_post_to_three_backends_with_digest_check(loop_thread):
    # OLB_MAX_BODY at 64 KiB: a blob of 3 MiB streams through regardless.
    proxy, sims = loop_thread.run(start(max_body=64 * 1024))
    c = Cluster(proxy, sims)
    try:
        data, digest = _blob(3 * 1024 * 1024)
        posts = [0, 0, 0]
        for k, sim in enumerate(sims):
            def counting(req, w, param, _k=k, _real=sim.api.blob_post):
                posts[_k] += 1
                return _real(req, w, param)
            sim.api.blob_post = counting  # the sim's router looks the handler up per request
        with httpx.Client(base_url=c.url) as http:
            assert http.head(f"/api/blobs/{digest}").status_code == 404
            # One backend has it already: only the other two get the upload.
            with httpx.Client() as direct_http:
                assert direct_http.post(f"{sims[0].url}/api/blobs/{digest}", content=data).status_code == 201
            assert http.head(f"/api/blobs/{digest}").status_code == 404
            resp = http.post(f"/api/blobs/{digest}", content=data)
            assert resp.status_code == 201
            assert c.have_blob(digest) == [True, True, True]
            assert posts == [1, 1, 1]  # the direct one, then olb's two
            assert http.head(f"/api/blobs/{digest}").status_code == 200
            # Again: everyone has it; the body is read and dropped, the connection stays usable.
            assert http.post(f"/api/blobs/{digest}", content=data).status_code == 200
            assert posts == [1, 1, 1]
            assert http.get("/api/tags").status_code == 200
            # A body that does not match its digest: each backend refuses it (CreateBlobHandler).
            _, other = _blob(1000)
            resp = http.post(f"/api/blobs/{other}", content=b"x" * 1000)
            assert resp.status_code == 400
            got = "sha256:" + hashlib.sha256(b"x" * 1000).hexdigest()
            assert resp.json() == {"error": f'digest mismatch, expected "{other}", got "{got}"'}
            assert c.have_blob(other) == [False, False, False]
    finally:
        loop_thread.run(c.close())


async def _upload_backend(reads: bool):
    """An Ollama-like backend that lacks every blob. An upload's body it reads
    as it comes (`reads`) or never; when olb closes the upload it records the
    bytes it had read in `closed`."""
    started, closed = [], []

    async def serve(reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method = head.split(b" ")[0]
            if method == b"POST":
                started.append(head)
                got = 0
                while True:
                    data = await reader.read(1 << 16) if reads else await reader.read()
                    if not data:
                        break
                    got += len(data)
                closed.append(got)
                return
            if method == b"HEAD":
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            else:
                body = b'{"models":[]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (len(body), body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    sock = socket.socket()
    if not reads:
        # A fixed, small receive buffer (accepted sockets inherit it): Linux
        # would otherwise grow it to tcp_rmem's max (32 MiB here) and the
        # deaf backend would swallow half the body before holding olb back.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.bind(("127.0.0.1", 0))
    server = await asyncio.start_server(serve, sock=sock)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}", started, closed


async def _until(condition, what, tries=1000):
    """Wait (bounded, 10 s) for an effect on the other side of a socket."""
    for _ in range(tries):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_blob_upload_paces_the_client_and_a_leaving_client_stops_it(loop):
    """A backend that takes nothing holds the client back (at the pace of the slowest);
    a client that leaves mid-upload closes every backend upload."""
    from olb.flow import BODY

    async def main():
        deaf, deaf_url, deaf_started, deaf_closed = await _upload_backend(reads=False)
        fast, fast_url, _, fast_closed = await _upload_backend(reads=True)
        proxy, sims = await start(extra_backends=[deaf_url, fast_url], max_body=64 * 1024)
        c = Cluster(proxy, sims, [deaf, fast])
        try:
            data, digest = _blob(96 * 1024 * 1024)
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"POST /api/blobs/%s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: %d\r\n\r\n"
                         % (digest.encode(), len(data)))
            writer.write(data)  # queued in this client's transport; olb reads what it can pass on
            await _until(lambda: deaf_started, "the upload to the deaf backend")
            await _until(lambda: any(cl.gate.reasons & BODY for cl in proxy.ctx.clients),
                         "olb to pause reading the client")
            # Paused, not done: most of the body is still in the client's buffer
            # (the rest at most in olb's socket buffers: tcp_rmem's max is 32 MiB).
            buffered = writer.transport.get_write_buffer_size()
            assert buffered > 48 * 1024 * 1024, buffered
            writer.transport.abort()  # gone mid-body
            await _until(lambda: deaf_closed and fast_closed, "the uploads to close")
            # The fast backend got no further than the deaf one let olb read (its
            # socket buffers, olb's, the fan-out's 256 KiB): far from the whole body.
            assert fast_closed[0] < len(data) // 2, fast_closed
            assert c.have_blob(digest) == [False, False, False]
            probe = await RawClient.connect(proxy.port)
            probe.send("GET", "/api/tags")
            assert (await probe.response()).status == 200
            probe.close()
        finally:
            await c.close()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_pull_room_skips_backends_too_small(loop_thread):
    proxy, sims = loop_thread.run(start(pull="room"))
    c = Cluster(proxy, sims)
    try:
        models = proxy.balancer.models
        # llama3.2:1b is 1.3 GB (sims[0] lists it); sims[1] has 1 GiB of GPU memory, sims[2] unknown.
        loop_thread.call(models.set_gpu_memory, 0, 8 << 30, 1)
        loop_thread.call(models.set_gpu_memory, 1, 1 << 30, 1)
        with ollama.Client(host=c.url) as client:
            assert client.pull("llama3.2:1b").status == "success"
        assert c.installed("llama3.2:1b") == [True, False, True]
        assert [s.stats.by_path.get("/api/pull", 0) for s in sims] == [1, 0, 1]
    finally:
        loop_thread.run(c.close())


def test_status_shows_which_backends_lack_which_models(cluster, client):
    with httpx.Client(base_url=cluster.admin_url) as http:
        lacking = http.get("/olb/status").json()["lacking"]
    urls = [s.url for s in cluster.sims]
    assert lacking == {"all-minilm:latest": urls[:2], "llama3.2:1b": urls[1:], "qwen2.5:0.5b": [urls[0], urls[2]]}
    client.pull("all-minilm")
    with httpx.Client(base_url=cluster.admin_url) as http:
        assert "all-minilm:latest" not in http.get("/olb/status").json()["lacking"]


def test_management_does_not_wait_for_an_inference_slot(loop_thread):
    """Every slot busy and a request queued: pull, copy, delete, blobs and stop still answer."""
    slow = SimConfig(token_rate=20, ttft=0, seed=3, num_predict_default=100_000)

    async def fill(port):
        streams = []
        for i in range(3):
            client = await RawClient.connect(port)
            client.send("POST", "/api/generate", {"model": "llama3.2:1b", "prompt": f"p{i}"})
            await asyncio.wait_for(client.reader.readuntil(b'"done":false'), 5)
            streams.append(client)
        queued = await RawClient.connect(port)
        queued.send("POST", "/api/generate", {"model": "llama3.2:1b", "prompt": "waits"})
        streams.append(queued)
        return streams

    async def boot():
        sims = [await start_sim(slow.replace(models=("llama3.2:1b",))) for _ in range(3)]
        proxy = await start_proxy(proxy_config([s.url for s in sims], policy="least-inflight", max_inflight=1))
        return proxy, sims

    proxy, sims = loop_thread.run(boot())
    c = Cluster(proxy, sims)
    try:
        streams = loop_thread.run(fill(proxy.port))
        loop_thread.run(_until(lambda: len(proxy.balancer.queue) == 1, "the fourth request to queue"))
        assert [proxy.balancer.table.inflight(i) for i in range(3)] == [1, 1, 1]
        with ollama.Client(host=c.url, timeout=10) as client:
            assert client.pull("qwen2.5:0.5b").status == "success"
            assert client.copy("qwen2.5:0.5b", "q-copy").status == "success"
            assert client.delete("q-copy").status == "success"
            assert client.generate(model="qwen2.5:0.5b", keep_alive=0).done_reason == "unload"
        with httpx.Client(base_url=c.url, timeout=10) as http:
            data, digest = _blob(1000)
            assert http.post(f"/api/blobs/{digest}", content=data).status_code == 201
            assert http.head(f"/api/blobs/{digest}").status_code == 200
        assert len(proxy.balancer.queue) == 1  # still waiting: nothing above took its place
        for s in streams:
            s.close()
    finally:
        loop_thread.run(c.close())


def test_a_client_that_leaves_a_pull_stops_it_on_every_backend(loop):
    """Closing a pull's connection is what stops Ollama's download (PullHandler's
    context is the request's): olb closes every backend's pull at once."""

    async def main():
        eofs = []

        async def serve(reader, writer):
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                if b"/api/pull" not in head:
                    body = b'{"models":[]}'
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                                 % (len(body), body))
                    return
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                line = b'{"status":"pulling manifest"}\n'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                             b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(line), line))
                await reader.read()  # the download goes on until olb closes
                eofs.append(head)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        servers = [await asyncio.start_server(serve, "127.0.0.1", 0) for _ in range(3)]
        urls = [f"http://127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in servers]
        proxy = await start_proxy(proxy_config(urls, models_interval=60))
        try:
            client = await RawClient.connect(proxy.port)
            client.send("POST", "/api/pull", {"model": "llama3.1:8b"})
            await asyncio.wait_for(client.reader.readuntil(b'"pulling manifest"'), 5)
            client.writer.transport.abort()
            await _until(lambda: len(eofs) == 3, "every backend's pull to be closed")
        finally:
            await proxy.close()
            for s in servers:
                s.close()
                await s.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 30))
