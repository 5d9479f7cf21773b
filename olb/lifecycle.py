"""Reload, graceful shutdown and hand-over for one worker (docs/operations.md,
"Configuration file and reload" and "Shutdown and upgrades").

Theory of operation
-------------------
A configuration lives in a generation: a ProxyContext with its own Balancer
(backend table, queue, pools, health checks). Backend indices, the masks the
router and the model directory keep, and the table's size are all fixed for
a generation, so a reload never edits one in place: it builds a new one.

    reload    (SIGHUP, one worker) read the file again; refused with a log
              line naming the variable if anything is wrong, the old
              generation staying as it was. Else: a new generation starts;
              every client connection moves to it (its next request runs
              there); queued requests are routed again there in the old
              queue's order; running requests finish in the old one, whose
              table they were counted in. For a backend in both, the new table
              holds one slot per request still running there in the old one,
              given back as each ends (Balancer.handoff), so its capacity is
              kept across the reload. A removed backend gets no new request
              (drained) and its running ones finish. The old generation closes
              once nothing runs in it.
    retire    (SIGUSR2 from the supervisor, several workers: the supervisor
              reloads by starting new workers with the new configuration)
              stop accepting; queued and running requests finish here; each
              connection closes after its response; then the worker exits 0.
    stop      (SIGTERM, SIGINT) stop accepting; queued requests get 503 with
              Retry-After at once; running ones get OLB_SHUTDOWN_TIMEOUT to
              finish, then those left are cut and logged; exit 0.

RELOAD_HOOKS lets other parts that read files of their own on SIGHUP (API
keys) take part: see reload_hooks().
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from typing import Callable

from ._core import NO_BACKEND
from ._relay import monotonic
from .config import FIXED_ON_RELOAD, SETTINGS, Config, log_level_number
from .errors import ConfigError
from .proxy import ClientSideProtocol

log = logging.getLogger("olb.lifecycle")

#: Seconds between looks at whether an old generation (or a stopping
#: worker) still has requests running.
SETTLE_POLL = 0.05

#: Seconds a connection accepted while stopping has to send its request
#: before it is closed as idle (a keep-alive connection idle that long is
#: closed at once).
IDLE_GRACE = 1.0

#: Called on every reload with the new Config, before anything changes: a
#: hook raises ConfigError (naming its variable) to refuse the reload, or
#: returns a function to call once every hook has accepted (or None). Not
#: called at start-up (read your file then yourself). With one worker they
#: run in it; with several, in the supervisor before it forks the new
#: workers, which inherit what the functions applied.
RELOAD_HOOKS: list[Callable[[Config], Callable[[], None] | None]] = []


def check_reload(old: Config, new: Config) -> list[Callable[[], None]]:
    """Validate a reloaded configuration against the running one.

    Returns:
        the hooks' functions to apply it.

    Raises:
        ConfigError: a setting that cannot change while olb runs changed
            (FIXED_ON_RELOAD), or a hook refused.
    """
    envs = {s.field: s.env for s in SETTINGS}
    for field in FIXED_ON_RELOAD:
        before = (old.listen_host, old.listen_port) if field == "listen" else getattr(old, field)
        after = (new.listen_host, new.listen_port) if field == "listen" else getattr(new, field)
        if before != after:
            raise ConfigError(f"{envs[field]}: cannot change on reload (restart olb to change it)")
    commits = []
    for hook in RELOAD_HOOKS:
        commit = hook(new)
        if commit is not None:
            commits.append(commit)
    return commits


class Lifecycle:
    """Signals -> reload, retire or stop for one worker's ProxyServer."""

    def __init__(self, server, load: Callable[[], Config] | None = None):
        """`load` reads the configuration again (flags, environment, OLB_CONFIG);
        None where this worker does not reload itself (several workers)."""
        self.server = server
        self.loop = server.loop
        self._load = load
        #: The configuration as loaded (before the demo's backends or a
        #: resolved port were added): what a reload is compared with.
        self.loaded: Config | None = None
        #: Generations still running requests after a reload.
        self.retiring: list = []
        self._done = asyncio.Event()
        self._action: str | None = None

    # --- signals -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """SIGTERM, SIGINT."""
        if self._action != "stop":
            self._action = "stop"
            self._done.set()

    def request_retire(self) -> None:
        """SIGUSR2 from the supervisor: new workers took over."""
        if self._action is None:
            self._action = "retire"
            self._done.set()

    def reload(self) -> None:
        """SIGHUP (one worker): read the configuration again and apply it, or refuse it."""
        if self._load is None or self._action is not None:
            return
        try:
            loaded = self._load()
            commits = check_reload(self.loaded, loaded) if self.loaded is not None else []
        except ConfigError as exc:
            log.error("reload refused, the old settings stay: %s", exc)
            return
        old_cfg = self.server.ctx.config
        demo = old_cfg.backends[len(self.loaded.backends):] if self.loaded is not None else ()
        cfg = dataclasses.replace(loaded, listen_port=old_cfg.listen_port, backends=loaded.backends + demo)
        self.loaded = loaded
        for commit in commits:
            commit()
        logging.getLogger().setLevel(log_level_number(cfg.log_level))
        self.swap(cfg)

    async def run(self) -> None:
        """Wait for SIGTERM or the supervisor's retire, and carry it out."""
        await self._done.wait()
        if self._action == "retire":
            await self._retire()
        if self._action == "stop":  # also a SIGTERM that came while handing over
            await self._stop()

    # --- reload ---------------------------------------------------------------------------------

    def swap(self, cfg: Config) -> None:
        """Start a generation for `cfg` and move connections and the queue to it."""
        server = self.server
        old = server.ctx
        new = server.new_context(cfg)
        old_index = {(b.spec.host, b.spec.port): b.index for b in old.balancer.backends}
        new_keys = {(s.host, s.port) for s in cfg.backends}
        table = new.balancer.table
        for j, spec in enumerate(cfg.backends):
            i = old_index.get((spec.host, spec.port))
            if i is None:
                log.warning("reload: backend %s added", spec.url)
                continue
            # Capacity holds across the reload: the new table counts what the
            # old one still runs on this backend until each request ends.
            running = old.balancer.table.inflight(i)
            only = bytearray(table.n)
            only[j] = 1
            held = 0
            while held < running and table.acquire(only) != NO_BACKEND:
                held += 1
            if held:
                old.balancer.handoff[i] = [new.balancer, j, held]
        for b in old.balancer.backends:
            if (b.spec.host, b.spec.port) not in new_keys:
                log.warning("reload: backend %s removed; %d running request(s) finish there first",
                            b.url, old.balancer.table.inflight(b.index))
        new.started = old.started
        server.ctx = new
        server.balancer = new.balancer
        server.config = cfg
        server.start_context(new)
        server.telemetry = new.telemetry
        for j, spec in enumerate(cfg.backends):
            i = old_index.get((spec.host, spec.port))
            if i is None:
                continue
            before = old.balancer.backends[i]
            if old.balancer.drained[i]:
                new.balancer.drain(j, True)
            if not before.up:
                new.balancer.mark_down(j, before.last_error or "down before the reload")
        for client in list(old.clients):
            client.ctx = new
            new.clients.add(client)
        old.clients.clear()
        moved = 0
        queue = old.balancer.queue
        for waiter in queue.service_order():  # taking each out as it comes: the fair order
            old.balancer.dequeue(waiter)
            waiter.moved(new)
            moved += 1
        log.warning("reload: %d backend(s), %d queued request(s) moved to them", len(cfg.backends), moved)
        self.retiring.append(old)
        self.loop.create_task(self._close_when_idle(old))

    async def _close_when_idle(self, old) -> None:
        while self._running_in(old):
            await asyncio.sleep(SETTLE_POLL)
        if old in self.retiring:
            self.retiring.remove(old)
            await self.server.close_context(old)
            log.info("reload: the previous configuration's last request ended")

    def _running_in(self, ctx) -> bool:
        return any(c.exchange is not None and c.exchange.ctx is ctx for c in self.server.ctx.clients)

    # --- retire and stop ------------------------------------------------------------------------

    async def _stop_accepting(self) -> None:
        """Close the listening socket without refusing a connection the kernel already took.

        Closing a listener resets the connections in its accept queue (with
        net.ipv4.tcp_migrate_req off, the default, they are not handed to the
        other sockets of the SO_REUSEPORT group). So: take our own descriptor
        of it, let the loop stop listening, accept what is queued until none
        is left, and close it then; a new olb on the port (or this olb's other
        workers) takes every connection after that.
        """
        for ctx in self._contexts():
            ctx.closing = True
        listener = self.server._server
        if listener is None:
            return
        own = None
        try:
            own = socket.socket(fileno=os.dup(listener.sockets[0].fileno()))
            own.setblocking(False)
        except (OSError, IndexError, TypeError):  # closed already (a stop after a hand-over)
            pass
        listener.close()
        await asyncio.sleep(0)  # the loop's close of its descriptor
        if own is not None:
            ctx = self.server.ctx
            with own:
                while True:
                    try:
                        conn, _ = own.accept()
                    except OSError:  # BlockingIOError: nothing left
                        break
                    conn.setblocking(False)
                    await self.loop.connect_accepted_socket(lambda: ClientSideProtocol(ctx), conn)
        self._close_idle()

    def _close_idle(self) -> bool:
        """Close the connections with no request running that have had
        IDLE_GRACE to send one; True while any connection is left."""
        now = monotonic()  # (ClientSideProtocol.last_active's clock)
        for client in list(self.server.ctx.clients):
            if client.exchange is None and now - client.last_active >= IDLE_GRACE:
                client.transport.close()
                self.server.ctx.clients.discard(client)
        return bool(self.server.ctx.clients)

    def _contexts(self) -> list:
        return [self.server.ctx, *self.retiring]

    async def _retire(self) -> None:
        await self._stop_accepting()
        log.info("handing over to new workers: finishing the queued and running requests")
        while (self._close_idle() or self.server.ctx.balancer.queue) and self._action == "retire":
            await asyncio.sleep(SETTLE_POLL)
        if self._action == "retire":
            await self._close()

    async def _close(self) -> None:
        await self.server.close()
        retiring, self.retiring = self.retiring, []
        for ctx in retiring:
            await self.server.close_context(ctx)

    async def _stop(self) -> None:
        await self._stop_accepting()
        refused = 0
        for ctx in self._contexts():
            balancer = ctx.balancer
            balancer.stopping = True
            for waiter in balancer.queue.service_order():
                balancer.dequeue(waiter)
                waiter.queue_closed()
                refused += 1
        timeout = self.server.config.shutdown_timeout
        running = sum(1 for c in self.server.ctx.clients if c.exchange is not None)
        log.warning("stopping: %d queued request(s) refused (503), %d running get up to %gs to finish "
                    "(OLB_SHUTDOWN_TIMEOUT)", refused, running, timeout)
        deadline = self.loop.time() + timeout
        while self._close_idle() and self.loop.time() < deadline:
            await asyncio.sleep(SETTLE_POLL)
        for client in list(self.server.ctx.clients):
            ex = client.exchange
            if ex is not None:
                log.warning("stopping: cut %s after OLB_SHUTDOWN_TIMEOUT=%gs", describe(ex), timeout)
        await self._close()


def describe(exchange) -> str:
    """A running request in a log line: method, path, model, backend."""
    req = exchange.req
    text = f"{req.method.decode()} {req.target.decode(errors='replace')}"
    model = getattr(exchange, "model", None)
    if model:
        text += f" (model {model})"
    index = getattr(exchange, "index", NO_BACKEND)
    if index is not None and index >= 0:
        text += f" on {exchange.ctx.balancer.backends[index].url}"
    return text


#: Signals whose default action ends the process: held back (blocked) from
#: start-up until their handlers are in place, then delivered.
HELD_SIGNALS = {signal.SIGHUP, signal.SIGUSR2}


def block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)


def unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
