# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""Where a request goes: the placement rules, as a function of state.

Rules for this module: no I/O, no awaiting, no Exchange. A Router reads the
backend table (olb/_core.pyx), the model directory (olb/models.py) and the
queue's per-model counts, and returns a Decision: admit on a backend (its
slot already counted in the table, as BackendTable.acquire counts it), wait
in olb's queue with an admission mask, or fail. The balancer owns the
Router; proxy.Exchange carries the decision out. Each rule is written once
in docs/scheduling.md, with the Ollama function (server/sched.go) it
follows; the comments below name the rule.

Theory of operation
-------------------
A request that names a model has a *runner key* (models.parse_request:
the runner options Ollama's needsReload compares). Router.route applies
rules 1 (warm), 2 (room), 3 (spare), 4 (least harm) and 5 (wait) in that
order, with rule E (a model leaving a backend for a load that evicts it)
inside the warm masks (ModelDirectory.warm_mask); route_any and
route_no_slot are rule 0, for requests without a model or without a slot.
docs/scheduling.md states each rule once; the comments below name them.
"""

from __future__ import annotations

from ._core import NO_BACKEND
from .fairqueue import BATCH, INTERACTIVE
from .models import any_set, bits, to_mask

#: Decision kinds.
ADMIT, WAIT, FAIL = range(3)
#: Why a FAIL: no backend is reachable (502), the model is nowhere (404).
UNREACHABLE, MISSING = range(2)


class Decision:
    """The outcome of one routing step.

    ADMIT: `index` is the backend, already counted in flight; `placed` is
    true when the model is not warm there (the request makes it load).
    WAIT: `mask` is the admission mask to queue with (possibly a model's
    live loaded mask). FAIL: `reason` is UNREACHABLE or MISSING.
    """


    def __init__(self, kind: int, index: int = NO_BACKEND, mask=None, placed: bool = False,
                 reason: int = UNREACHABLE):
        self.kind = kind
        self.index = index
        self.mask = mask
        self.placed = placed
        self.reason = reason

    def __repr__(self) -> str:
        name = ("ADMIT", "WAIT", "FAIL")[self.kind]
        if self.kind == ADMIT:
            return f"Decision({name}, {self.index}, placed={self.placed})"
        if self.kind == WAIT:
            return f"Decision({name}, {None if self.mask is None else bytes(self.mask)!r})"
        return f"Decision({name}, {('UNREACHABLE', 'MISSING')[self.reason]})"


def admit(index: int, placed: bool = False) -> Decision:
    if not placed and index < len(_ADMITS):
        # Decisions are values nobody changes: the common one, a backend
        # with no placement, is made once per index (no object a request).
        return _ADMITS[index]
    return Decision(ADMIT, index, placed=placed)


def wait(mask) -> Decision:
    return Decision(WAIT, mask=mask)


UNREACHABLE_DECISION = Decision(FAIL, reason=UNREACHABLE)
_ADMITS = tuple(Decision(ADMIT, i) for i in range(1024))
MISSING_DECISION = Decision(FAIL, reason=MISSING)


def without(mask, excluded):
    """`mask` less the backends in `excluded` (those that failed a request).
    Without exclusions it is the mask itself, so a queued request keeps a
    live mask and sees a backend that starts serving its model while it
    waits."""
    if excluded is None:
        return mask
    return to_mask(bits(mask) & ~bits(excluded), len(mask))


class Router:
    """The placement rules over one worker's table, directory and queue counts.

    Args:
        table: the compiled BackendTable (selection and in-flight counts).
        models: the ModelDirectory, or None when olb does not route by model.
        queued: requests waiting in olb's queue, per model (a Counter the
            balancer keeps).
        spread_queue: OLB_SPREAD_QUEUE.
        session_bound: OLB_SESSION_BOUND (0: conversations are not kept together).
    """


    def __init__(self, table, models, queued, spread_queue: int, session_bound: float):
        self.table = table
        self.models = models
        self.queued = queued
        self.spread_queue = spread_queue
        self.session_bound = session_bound
        #: route() calls, and those that went past rule 1 (rules 2-5 ran:
        #: the cold path, tens of µs where rule 1 is about one). Their
        #: ratio shows how often a request pays for the cold path
        #: (/olb/status "routing").
        self.decisions = 0
        self.cold_decisions = 0
        self._next_pick = 0

    # --- the table ---------------------------------------------------------------------

    def acquire(self, allowed=None, affinity: int | None = None) -> int:
        """A backend counted in flight, or NO_BACKEND. With an affinity key
        (a conversation) the backend the key hashes to is preferred while
        within OLB_SESSION_BOUND of the average load."""
        if affinity is None or not self.session_bound:
            return self.table.acquire(allowed)
        return self.table.acquire_affine(affinity, allowed, self.session_bound)

    def pick(self, allowed=None) -> int:
        """A healthy backend for a request that runs no model, or NO_BACKEND.

        Such a request (models.takes_slot) takes no slot: nothing is counted,
        so there is nothing to release, and it never queues. Each call starts
        after the last backend picked, so they share the work.
        """
        table = self.table
        n = table.n
        start = self._next_pick
        for k in range(n):
            i = (start + k) % n
            if (allowed is None or allowed[i]) and table.is_healthy(i):
                self._next_pick = i + 1
                return i
        return NO_BACKEND

    def usable(self, allowed=None) -> bool:
        """Is any allowed backend healthy (full or not)?"""
        table = self.table
        for i in range(table.n):
            if (allowed is None or allowed[i]) and table.is_healthy(i):
                return True
        return False

    def not_leaving(self, model: str, mask):
        """`mask` (None: every backend) less the backends `model` is leaving
        (rule E): for a request queued before the load that evicts it began."""
        leaving = self.models.leaving.get(model)
        n = self.table.n
        if leaving is None:
            return mask
        away = bits(bytes(1 if count else 0 for count in leaving))
        return to_mask((bits(mask) if mask is not None else bits(b"\x01" * n)) & ~away, n)

    # --- decisions ---------------------------------------------------------------------

    def route_any(self, allowed=None, affinity: int | None = None) -> Decision:
        """Rule 0: the least loaded allowed backend, else wait while one is up."""
        index = self.acquire(allowed, affinity)
        if index != NO_BACKEND:
            return admit(index)
        if not self.usable(allowed):
            return UNREACHABLE_DECISION
        return wait(allowed)

    def route_no_slot(self, model: str | None, allowed=None, excluded=None) -> Decision:
        """Rule 0 for a request that runs no model (models.takes_slot:
        /api/show, /api/version, ...): a healthy backend now, one that has
        the model when it names one; never a slot or the queue."""
        mask = allowed
        if model is not None:
            installed = self.models.installed_mask(model)
            if excluded is None and not any_set(installed):
                return MISSING_DECISION
            mask = installed if mask is None else to_mask(bits(mask) & bits(installed), len(installed))
        index = self.pick(mask)
        return admit(index) if index != NO_BACKEND else UNREACHABLE_DECISION

    def route(self, model: str, runner: tuple = (), affinity: int | None = None,
              excluded=None) -> Decision:
        """Where a request for `model` (normalised) with runner options
        `runner` goes; `excluded`: backends that already failed it."""
        self.decisions += 1
        models = self.models
        installed_all = models.installed_mask(model)
        if excluded is None and not any_set(installed_all):
            # Every backend's catalogue is known and none has it: Ollama's 404.
            return MISSING_DECISION
        spread = self.spread_queue
        queued = self.queued.get(model, 0)  # (a Counter: get() is dict's, [] a Python-level slot)
        warm = without(models.warm_mask(model, runner), excluded)
        # Rule 1, warm. Waiting for the model counts olb's queue and the
        # requests a backend holds behind a load olb started: on a cold
        # start every request piles onto the one backend loading it, where
        # least-in-flight would start a load on each idle GPU.
        if any_set(warm) and queued + models.waiting_for_load(model) < spread:
            index = self.acquire(warm, affinity)
            if index != NO_BACKEND:
                return admit(index)
            if self.usable(warm) and queued < spread:
                return wait(warm)
        self.cold_decisions += 1
        n = len(installed_all)
        installed = without(installed_all, excluded)
        loaded = bits(models.loaded_mask(model))
        # Fresh loads: installed, the model not resident there under any
        # runner options.
        cold = to_mask(bits(installed) & ~loaded, n)
        # Rule 2, room: where the model fits beside the resident ones, a load
        # that evicts nothing. When those backends are all full of requests
        # right now, wait for one of them (or a warm one) rather than evict
        # elsewhere: under load that fallback made two models take turns on
        # a small GPU, a load every few requests.
        fit = models.fits(model, cold)
        if any_set(fit) and self.usable(fit):  # (a backend that is down has no room)
            index = self.acquire(fit, affinity)
            if index != NO_BACKEND:
                return admit(index, placed=True)
            return self.route_any(to_mask(bits(warm) | bits(fit), n), affinity)
        # Rule 3, spare: load only where no model in use can be evicted. With
        # no such backend, a model warm somewhere waits for its warm
        # backends; a cold one must load somewhere all the same.
        spare = models.spare(model, cold, self.queued)
        if any_set(spare):
            cold = spare
        elif any_set(warm) and self.usable(warm):
            return self.route_any(warm, affinity)
        elif models.held(model):
            # Rule E: leaving a backend, with no other warm copy and no room
            # or spare backend elsewhere. It waits (held) until that load is
            # seen, rather than stall the load or evict another model.
            return wait(warm)
        else:
            # Where the model runs under other runner options, a load is a
            # reload of its runner (needsReload): a candidate too.
            cold = to_mask(bits(cold) | (loaded & bits(installed) & ~bits(warm)), n)
        # Rule 4, least harm, then anywhere in the candidates.
        cheapest = models.least_harm(cold)
        index = self.acquire(cheapest, affinity) if cheapest is not None else NO_BACKEND
        if index == NO_BACKEND:
            index = self.acquire(cold, affinity)
        if index != NO_BACKEND:
            return admit(index, placed=True)
        # Rule 5, wait for any backend that has it, while one is up.
        if self.usable(installed):
            return wait(installed)
        return UNREACHABLE_DECISION


def queue_identity(req, client_header: str, priority_header: str, peer_ip: bytes) -> tuple[bytes, int]:
    """Who is asking, for fair queuing, and in which class (fairqueue.INTERACTIVE or BATCH).

    The client is OLB_CLIENT_HEADER's value when set and sent, else the
    bearer token, else the peer address; the class is batch when
    OLB_PRIORITY_HEADER says `batch` or `low`. Worked out only for
    requests that must wait: the fast path never pays.
    """
    client = req.header(client_header.encode()) if client_header else None
    if client is None:
        auth = req.header(b"authorization")
        if auth and auth[:7].lower() == b"bearer ":
            client = b"key:" + auth[7:]
        else:
            client = b"ip:" + peer_ip
    value = req.header(priority_header.encode())
    priority = BATCH if value is not None and value.strip().lower() in (b"batch", b"low") else INTERACTIVE
    return client, priority
