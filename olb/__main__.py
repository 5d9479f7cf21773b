"""`olb-fast`: configuration, the demo cluster, and the worker processes.

Signals (olb/lifecycle.py, docs/operations.md): SIGHUP reloads the
configuration, SIGTERM and SIGINT stop after running streams finish.

With OLB_WORKERS=1 (the default) the proxy runs in this process. With more,
this process becomes a supervisor: it reserves the port, creates the shared
in-flight counters (an anonymous shared mmap, inherited across fork), forks
the workers — each binds the port with SO_REUSEPORT and runs its own uvloop
— and restarts any worker that dies after reclaiming the requests it still
held in the shared counts, so capacity is not leaked. A reload starts a new
generation of workers with the new configuration and its own shared counts,
and the old generation hands over (SIGUSR2) and exits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import mmap
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

from . import config as config_mod
from . import local
from .errors import ConfigError

log = logging.getLogger("olb")

#: A worker that dies sooner than this after its start is restarted only
#: after a pause, so a crash loop does not spin the CPU.
RESTART_BACKOFF = 1.0


def main(argv: list[str] | None = None) -> None:
    from .lifecycle import block_signals

    block_signals()  # until the handlers are in place (lifecycle.HELD_SIGNALS)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker reopens its log on it
    try:
        cfg = config_mod.load(argv)
    except ConfigError as exc:
        print(f"olb-fast: {exc}", file=sys.stderr)
        sys.exit(exc.exit_status)
    from .accesslog import configure_logging

    configure_logging(config_mod.log_level_number(cfg.log_level), cfg.log_format)
    # Every client and backend connection is a descriptor: take all the
    # system allows this process (olb/local.py).
    before, now = local.raise_nofile_limit()
    if now != before:
        log.info("RLIMIT_NOFILE raised from %d to %d", before, now)
    loaded = cfg
    sim_pid = None
    if cfg.demo:
        sim_pid, urls = start_demo_cluster(cfg.demo)
        backends = config_mod.parse_backends(",".join(urls), cfg.max_inflight, var="--demo")
        cfg = dataclasses.replace(cfg, backends=cfg.backends + backends)

    def reload() -> config_mod.Config:
        return config_mod.load(argv)

    try:
        if cfg.workers == 1:
            # SO_REUSEPORT even alone: a new olb can take over the port while
            # this one drains (docs/operations.md, Shutdown and upgrades).
            sock = _bind_or_exit(cfg, reuse_port=True)
            admin_sock = _bind_admin_or_exit(cfg, reuse_port=True)
            admin_port = admin_sock.getsockname()[1] if admin_sock else None
            run_worker(cfg, sock, None, None, 0, load=reload, loaded=loaded,
                       ready=lambda: _announce(cfg, sock.getsockname()[1], admin_port),
                       admin_sock=admin_sock)
        else:
            supervise(cfg, reload, loaded)
    finally:
        if sim_pid is not None:
            _kill(sim_pid)


def _bind_or_exit(cfg, reuse_port: bool) -> socket.socket:
    from .server import bind_socket

    try:
        return bind_socket(cfg.listen_host, cfg.listen_port, reuse_port=reuse_port)
    except OSError as exc:
        print(f"olb-fast: OLB_LISTEN: cannot listen on {cfg.listen_host}:{cfg.listen_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)


def _bind_admin_or_exit(cfg, reuse_port: bool) -> socket.socket | None:
    """The admin listener's socket (OLB_ADMIN_LISTEN), or None when it is off."""
    from .server import bind_socket

    if cfg.admin_listen is None:
        return None
    host, port = cfg.admin_listen
    try:
        return bind_socket(host, port, reuse_port=reuse_port)
    except OSError as exc:
        print(f"olb-fast: OLB_ADMIN_LISTEN: cannot listen on {host}:{port}: {exc.strerror or exc} "
              f"(set OLB_ADMIN_LISTEN=HOST:PORT, or off)", file=sys.stderr)
        sys.exit(2)


def _admin_url(cfg, admin_port: int | None) -> str | None:
    if admin_port is None:
        return None
    host = cfg.admin_listen[0]
    return f"http://{f'[{host}]' if ':' in host else host}:{admin_port}"


def _announce(cfg, port: int, admin_port: int | None = None) -> None:
    url = f"http://{cfg.listen_host}:{port}"
    backends = ", ".join(b.url for b in cfg.backends)
    print(f"olb-fast listening on {url} ({cfg.workers} worker{'s' if cfg.workers > 1 else ''}) "
          f"in front of {backends}", flush=True)
    admin = _admin_url(cfg, admin_port)
    if admin is not None:
        print(f"olb-fast admin on {admin} (dashboard {admin}/olb/)", flush=True)
    else:
        print("olb-fast admin listener off (OLB_ADMIN_LISTEN=off)"
              + ("; admin endpoints on the data port behind OLB_ADMIN_TOKEN" if cfg.admin_token else ""),
              flush=True)
    if cfg.demo:
        host = f"{cfg.listen_host}:{port}"
        print(f"""
Demo: {cfg.demo} simulated Ollama instances (olb-sim) stand behind olb. Try, in another shell:

  curl {url}/api/tags
  curl {url}/api/generate -d '{{"model": "llama3.2", "prompt": "Why is the sky blue?"}}'
  curl {url}/api/chat -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "hi"}}], "stream": false}}'
  curl -N {url}/v1/chat/completions -d '{{"model": "llama3.2", "stream": true, "messages": [{{"role": "user", "content": "hi"}}]}}'
  curl {_admin_url(cfg, admin_port) or url}/olb/status      # the dashboard: {_admin_url(cfg, admin_port) or url}/olb/
  OLLAMA_HOST={host} ollama run llama3.2        # the real CLI works too

Ctrl-C stops olb and the simulated cluster.
""", flush=True)


# --- workers ----------------------------------------------------------------------------------


def run_worker(cfg, sock: socket.socket, shared, drained, worker: int, load=None, loaded=None,
               ready=None, admin_sock=None, samples=None, metrics_dir: str | None = None) -> None:
    import uvloop

    uvloop.run(_serve(cfg, sock, shared, drained, worker, load, loaded, ready, admin_sock, samples, metrics_dir))


async def _serve(cfg, sock, shared, drained, worker: int, load, loaded, ready, admin_sock=None,
                 samples=None, metrics_dir: str | None = None) -> None:
    from .balancer import new_table
    from .lifecycle import Lifecycle, unblock_signals
    from .server import start_proxy

    table = None
    if shared is not None:
        table = new_table(cfg, shared=shared, worker=worker, workers=cfg.workers)
    server = await start_proxy(cfg, sock=sock, table=table, worker=worker, drained=drained,
                               admin_sock=admin_sock, samples=samples, metrics_dir=metrics_dir)
    # What start-up built (modules, config, the table, the pools) lives as long
    # as the process: freeze it out of the cyclic collector's sight, so that a
    # full collection walks only request-time objects and stays short (a pause
    # here is every open stream's pause).
    gc.freeze()
    loop = asyncio.get_running_loop()
    life = Lifecycle(server, load)
    life.loaded = loaded
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, life.request_stop)
    if load is not None:
        loop.add_signal_handler(signal.SIGHUP, life.reload)
    else:
        # Several workers: the supervisor reloads by starting new ones and
        # sends SIGUSR2 to these; a SIGHUP sent to the whole group is its business.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        loop.add_signal_handler(signal.SIGUSR2, life.request_retire)
    loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)  # logrotate's postrotate
    unblock_signals()
    if ready is not None:
        ready()
    await life.run()


def supervise(cfg, load, loaded) -> None:
    from . import dashboard
    from ._core import shared_size
    from .balancer import new_table

    n = len(cfg.backends)
    shared = mmap.mmap(-1, shared_size(n, cfg.workers))  # MAP_SHARED | MAP_ANONYMOUS
    drained = mmap.mmap(-1, n)  # one byte per backend: draining (see admin.py)
    # The dashboard's counters, a row per worker (dashboard.Samples).
    samples = mmap.mmap(-1, dashboard.shared_size(cfg.workers))
    table = new_table(cfg, shared=shared, worker=0, workers=cfg.workers)
    # Resolve the port (OLB_LISTEN may say :0) and hold it while workers come
    # and go: a bound socket that never listens takes no connections from the
    # SO_REUSEPORT group.
    reserve = socket.socket(socket.AF_INET6 if ":" in cfg.listen_host else socket.AF_INET)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserve.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserve.bind((cfg.listen_host, cfg.listen_port))
    except OSError as exc:
        print(f"olb-fast: OLB_LISTEN: cannot listen on {cfg.listen_host}:{cfg.listen_port}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    cfg = dataclasses.replace(cfg, listen_port=reserve.getsockname()[1])
    # The admin port likewise (the workers bind it with SO_REUSEPORT too).
    reserve_admin = None
    if cfg.admin_listen is not None:
        host, port = cfg.admin_listen
        reserve_admin = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        reserve_admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        reserve_admin.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            reserve_admin.bind((host, port))
        except OSError as exc:
            print(f"olb-fast: OLB_ADMIN_LISTEN: cannot listen on {host}:{port}: {exc.strerror or exc} "
                  f"(set OLB_ADMIN_LISTEN=HOST:PORT, or off)", file=sys.stderr)
            sys.exit(2)
        cfg = dataclasses.replace(cfg, admin_listen=(host, reserve_admin.getsockname()[1]))
    # Where each worker publishes its counters for the others' scrapes (olb/metrics.py).
    metrics_dir = tempfile.mkdtemp(prefix="olb-metrics-") if cfg.metrics else None

    stopping = False
    # pid -> (worker slot, start time, generation); a reload starts a
    # generation: new workers with the new configuration and their own
    # shared counts, while the old ones finish what they hold and exit.
    children: dict[int, tuple[int, float, int]] = {}
    tables = {0: table}
    generation = 0
    supervisor = os.getpid()

    def spawn(worker: int) -> None:
        sock = _bind_or_exit(cfg, reuse_port=True)
        gen_shared, gen_drained = shared, drained
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_DFL)  # still blocked until the worker's handlers
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the worker's loop handles it
                _die_with_parent(supervisor)
                reserve.close()
                if reserve_admin is not None:
                    reserve_admin.close()
                run_worker(cfg, sock, gen_shared, gen_drained, worker, samples=samples, metrics_dir=metrics_dir)
            except BaseException:
                logging.getLogger("olb").exception("worker %d crashed", worker)
                code = 1
            finally:
                os._exit(code)
        sock.close()
        children[pid] = (worker, time.monotonic(), generation)

    def on_signal(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            _kill(pid, wait=False)

    def on_reload(signum, frame) -> None:
        nonlocal cfg, loaded, shared, drained, table, generation
        from .lifecycle import check_reload

        if stopping:
            return
        try:
            new = load()
            commits = check_reload(loaded, new)
        except ConfigError as exc:
            log.error("reload refused, the old settings stay: %s", exc)
            return
        for commit in commits:
            commit()
        logging.getLogger().setLevel(config_mod.log_level_number(new.log_level))  # the new workers inherit it
        demo = cfg.backends[len(loaded.backends):]
        was_draining = {(b.host, b.port) for i, b in enumerate(cfg.backends) if drained[i]}
        loaded = new
        cfg = dataclasses.replace(new, listen_port=cfg.listen_port, admin_listen=cfg.admin_listen,
                                  backends=new.backends + demo)
        n = len(cfg.backends)
        shared = mmap.mmap(-1, shared_size(n, cfg.workers))
        drained = mmap.mmap(-1, n)
        for i, b in enumerate(cfg.backends):  # a drain asked for before the reload holds after it
            drained[i] = (b.host, b.port) in was_draining
        generation += 1
        table = tables[generation] = new_table(cfg, shared=shared, worker=0, workers=cfg.workers)
        old = [pid for pid, (_, _, gen) in children.items() if gen != generation]
        for w in range(cfg.workers):
            spawn(w)
        for pid in old:
            try:
                os.kill(pid, signal.SIGUSR2)  # lifecycle.Lifecycle.request_retire
            except ProcessLookupError:
                pass
        log.warning("reload: %d backend(s); %d new worker(s) took over, %d finish what they hold",
                    n, cfg.workers, len(old))

    def on_usr1(signum, frame) -> None:
        # logrotate signals the supervisor (the pid systemd knows): each worker reopens its file.
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_reload)
    signal.signal(signal.SIGUSR1, on_usr1)
    for w in range(cfg.workers):
        spawn(w)
    _announce(cfg, cfg.listen_port, cfg.admin_listen[1] if reserve_admin is not None else None)
    from .lifecycle import unblock_signals

    unblock_signals()
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        worker, started, gen = children.pop(pid)
        if stopping:
            continue
        if gen != generation:
            # A worker of an earlier configuration, retired by a reload.
            tables[gen].reclaim_worker(worker)
            if not any(g == gen for _, _, g in children.values()):
                del tables[gen]
            if status != 0:
                log.error("retired worker %d (pid %d) ended with %s", worker, pid, _describe_status(status))
            continue
        reclaimed = table.reclaim_worker(worker)
        log.error("worker %d (pid %d) died (%s); reclaimed %d in-flight request(s); restarting",
                  worker, pid, _describe_status(status), reclaimed)
        if time.monotonic() - started < RESTART_BACKOFF:
            time.sleep(RESTART_BACKOFF)
            if stopping or gen != generation:  # SIGTERM, or a reload, arrived during the pause
                continue
        spawn(worker)
    if metrics_dir is not None:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    """Have the kernel send SIGTERM to this worker when its supervisor dies.

    Without it, a supervisor killed with SIGKILL leaves workers serving the
    port with nobody to restart them or reclaim their counts.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the workers outlive it
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _kill(pid: int, wait: bool = True) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        if wait:
            os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


# --- demo ---------------------------------------------------------------------------------------


def start_demo_cluster(count: int) -> tuple[int, list[str]]:
    """Fork a process serving `count` simulated Ollama instances on free ports.

    Returns its pid and the instances' URLs. The child exits when its parent
    does (it checks every second), so a killed olb leaves nothing behind.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            import uvloop

            uvloop.run(_demo_child(count, write_fd, os.getppid()))
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        urls = [line.strip() for line in pipe]
    if len(urls) != count:
        print("olb-fast: --demo: the simulated cluster did not start", file=sys.stderr)
        sys.exit(1)
    return pid, urls


async def _demo_child(count: int, write_fd: int, parent: int) -> None:
    from .sim import SimConfig, start_cluster

    servers = await start_cluster(count, SimConfig(num_parallel=4, seed=42))
    with os.fdopen(write_fd, "w") as pipe:
        for server in servers:
            pipe.write(server.url + "\n")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    while not stop.is_set() and os.getppid() == parent:
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            pass
    for server in servers:
        await server.close()


if __name__ == "__main__":
    main()
