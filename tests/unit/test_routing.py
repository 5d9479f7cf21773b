"""olb.routing without sockets: state in, decision out, one row per rule.

Each row builds a small cluster (a compiled BackendTable, a ModelDirectory
fed as its polls and traffic would feed it, the queue's per-model counts)
and asks the Router where one request goes. Decisions are written short:
"ADMIT 1", "ADMIT 1 placed" (the model loads there), "WAIT 011" (the queue,
with that admission mask), "FAIL MISSING" / "FAIL UNREACHABLE".
"""

import collections
from types import SimpleNamespace

import pytest

from olb._core import BackendTable
from olb.models import ModelDirectory
from olb.routing import ADMIT, MISSING, WAIT, Router, queue_identity

GB = 10**9
K8 = (("num_ctx", 8192),)


class World:
    """A cluster of n backends, each with `cap` slots, nothing polled yet."""

    def __init__(self, n=3, cap=2, spread=4):
        self.table = BackendTable([cap] * n, seed=1)
        self.models = ModelDirectory([SimpleNamespace(index=i, spec=None) for i in range(n)], 10, 1)
        self.queued = collections.Counter()
        self.router = Router(self.table, self.models, self.queued, spread, 0)
        self.n = n

    def catalogue(self, index, installed, resident=(), sizes=None):
        """Backend `index` has `installed`, with `resident` loaded ((name, GB) pairs with sizes)."""
        sizes = sizes or {}
        ps = [{"name": m, "size": sizes.get(m, 4) * GB, "size_vram": sizes.get(m, 4) * GB} for m in resident]
        self.models.set_catalogue(index, [{"name": m} for m in installed], ps)
        return self

    def everywhere(self, installed, resident_on):
        """Every backend has `installed`; resident_on: {backend: [models]}."""
        for i in range(self.n):
            self.catalogue(i, installed, resident_on.get(i, ()))
        return self

    def serve(self, model, index, count=1):
        """`count` requests for `model` in flight on the backend (table and directory)."""
        only = bytearray(self.n)
        only[index] = 1
        for _ in range(count):
            assert self.table.acquire(only) == index
            self.models.admitted(model, index, 1)
        return self

    def route(self, model, runner=(), excluded=None):
        return short(self.router.route(model, runner, None, excluded))


def short(decision):
    if decision.kind == ADMIT:
        return f"ADMIT {decision.index}" + (" placed" if decision.placed else "")
    if decision.kind == WAIT:
        return "WAIT " + "".join(str(b) for b in decision.mask)
    return "FAIL " + ("MISSING" if decision.reason == MISSING else "UNREACHABLE")


A, B, C, X = "a:latest", "b:latest", "c:latest", "x:latest"


def missing():
    return World().everywhere([A], {}), (X,), "FAIL MISSING"


def unknown_catalogue_may_have_it():
    return World(1), (X,), "ADMIT 0 placed"


def warm_first():
    return World().everywhere([A], {1: [A]}), (A,), "ADMIT 1"


def warm_full_waits_for_it():
    w = World().everywhere([A], {1: [A]}).serve(A, 1, 2)
    return w, (A,), "WAIT 010"


def spreads_past_spread_queue():
    # Four already wait for the warm backend: the next loads it where it is spare.
    w = World().everywhere([A], {1: [A]}).serve(A, 1, 2)
    w.queued[A] = 4
    return w, (A,), "ADMIT 0 placed"


def requests_behind_a_load_count_as_waiting():
    w = World(spread=2).everywhere([A], {})
    w.models.mark_placed(A, 1)
    w.serve(A, 1, 2)  # two requests wait behind its load there
    return w, (A,), "ADMIT 0 placed"


def excluded_backends_are_not_tried():
    w = World().everywhere([A], {0: [A], 1: [A]})
    return w, (A, (), bytearray([0, 1, 0])), "ADMIT 0"


def room_beside_the_resident_ones():
    # Backend 2 has shown three models together; it holds two: room for a.
    w = World()
    w.catalogue(2, [A, B, C], [A, B, C])
    w.catalogue(2, [A, B, C], [B, C])
    w.catalogue(0, [A], [X]).catalogue(1, [A], [X])
    return w, (A,), "ADMIT 2 placed"


def room_for_a_model_never_seen_loaded():
    # x was never loaded: its disk size, scaled as b's was (4 -> 5 GB), says
    # 10 GB, which fits beside b on 0's 60 GB free; by demand alone it would
    # evict c on the small 1.
    w = World(2)
    tags = [{"name": B, "size": 4 * GB}, {"name": C, "size": 4 * GB}, {"name": X, "size": 8 * GB}]
    w.models.set_catalogue(0, tags, [{"name": B, "size": 5 * GB, "size_vram": 5 * GB}])
    w.models.set_catalogue(1, tags, [{"name": C, "size": 5 * GB, "size_vram": 5 * GB}])
    w.models.set_gpu_memory(0, 60 * GB, 1)
    w.models.set_gpu_memory(1, 6 * GB, 1)
    past(w, B, 0, 4)
    return w, (X,), "ADMIT 0 placed"


def room_full_of_requests_waits_for_it():
    w = World()
    w.catalogue(2, [A, B, C], [A, B, C])
    w.catalogue(2, [A, B, C], [B, C])
    w.catalogue(0, [A], []).catalogue(1, [A], [])
    w.serve(B, 2, 2)
    return w, (A,), "WAIT 001"


def spare_before_evicting_a_model_in_use():
    w = World().everywhere([A, B, C], {0: [B], 1: [C], 2: [X]})
    w.serve(B, 0).serve(C, 1)
    return w, (A,), "ADMIT 2 placed"


def no_spare_a_warm_model_waits_for_its_warm_backends():
    w = World(2).everywhere([A, B], {0: [A], 1: [B]}).serve(A, 0, 2).serve(B, 1)
    w.queued[A] = 4
    return w, (A,), "WAIT 10"


def least_harm_prefers_an_idle_victim():
    # Nowhere spare (b and c were in demand), a cold model: backend 1's
    # resident is idle, 0's and 2's are serving.
    # c has had the most demand: by demand alone 0 or 2 would go.
    w = World().everywhere([A, B, C, X], {0: [B], 1: [C], 2: [X]})
    w.serve(B, 0).serve(X, 2)
    past(w, C, 1, 6)
    return w, (A,), "ADMIT 1 placed"


def least_harm_counts_the_stall():
    # Every resident is serving: the backend whose victim has the fewest
    # requests in flight stalls the least.
    # requests in flight there (c has had the most demand: by demand alone
    # 2 would go).
    w = World(cap=4).everywhere([A, B, C, X], {0: [B], 1: [C], 2: [X]})
    w.serve(B, 0, 3).serve(C, 1, 1).serve(X, 2, 2)
    past(w, C, 1, 6)
    return w, (A,), "ADMIT 1 placed"


def past(w, model, index, count):
    """`count` earlier requests for `model` on the backend, all ended: recent demand."""
    for _ in range(count):
        w.models.admitted(model, index, 1)
        w.models.admitted(model, index, -1)


def all_down_is_unreachable():
    w = World(2).everywhere([A], {0: [A]})
    w.table.set_health(0, False)
    w.table.set_health(1, False)
    return w, (A,), "FAIL UNREACHABLE"


def runner_with_matching_options():
    w = World().everywhere([A], {0: [A], 1: [A]})
    w.models.mark_placed(A, 0, K8)
    w.models.answered(A, 0, K8)
    return w, (A, K8), "ADMIT 0"


def default_options_avoid_a_runner_with_others():
    w = World().everywhere([A], {0: [A], 1: [A]})
    w.models.answered(A, 0, K8)
    return w, (A,), "ADMIT 1"


def other_options_load_a_fresh_runner_before_a_reload():
    # a runs on 0 with num_ctx 8192; a default request loads it on 1 (spare)
    # rather than reload the runner on 0.
    w = World(2).everywhere([A], {0: [A]})
    w.models.answered(A, 0, K8)
    return w, (A,), "ADMIT 1 placed"


def options_known_from_api_ps():
    w = World(2)
    for i in range(2):
        w.models.set_catalogue(i, [{"name": A}], [{"name": A, "size": GB, "context_length": 8192 * (i + 1)}])
    return w, (A, (("num_ctx", 16384),)), "ADMIT 1"


def default_options_take_a_runner_known_from_api_ps():
    w = World(2)
    for i in range(2):
        w.models.set_catalogue(i, [{"name": A}], [{"name": A, "size": GB, "context_length": 8192}])
    w.serve(A, 0)
    assert w.models.warm_mask(A) is w.models.loaded_mask(A)  # the live mask: no per-runner check
    return w, (A,), "ADMIT 1"


def reload_when_nowhere_else():
    w = World(2).catalogue(0, [A], [A]).catalogue(1, [B], [B])
    w.models.answered(A, 0, K8)
    return w, (A,), "ADMIT 0 placed"


def leaving(w, model=X, index=0):
    """olb sends `model` to backend `index`, where it evicts (one model of room)."""
    w.models.mark_placed(model, index)
    w.serve(model, index)
    return w


def a_leaving_model_goes_to_its_other_copy():
    w = World(2).everywhere([A, X], {0: [A], 1: [A]})
    leaving(w)
    return w, (A,), "ADMIT 1"


def a_leaving_model_without_another_copy_is_held():
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [B], [B])
    leaving(w)
    return w, (A,), "WAIT 00"


def a_leaving_model_may_load_where_it_fits():
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [A], [])
    w.models.footprint[A] = GB
    w.models.set_gpu_memory(1, 40 * GB, 1)
    leaving(w)
    return w, (A,), "ADMIT 1 placed"


def the_load_seen_ends_the_leaving():
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [B], [B])
    leaving(w)
    w.models.answered(X, 0)
    w.catalogue(0, [A, X], [A, X])  # /api/ps: a stayed (it was not the victim)
    return w, (A,), "ADMIT 0"


def an_abandoned_load_ends_the_leaving():
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [B], [B])
    leaving(w)
    w.models.admitted(X, 0, -1)  # its only request failed before an answer
    w.table.release(0)
    return w, (A,), "ADMIT 0"


CASES = [missing, unknown_catalogue_may_have_it, warm_first, warm_full_waits_for_it,
         spreads_past_spread_queue, requests_behind_a_load_count_as_waiting, excluded_backends_are_not_tried,
         room_beside_the_resident_ones, room_for_a_model_never_seen_loaded, room_full_of_requests_waits_for_it,
         spare_before_evicting_a_model_in_use, no_spare_a_warm_model_waits_for_its_warm_backends,
         least_harm_prefers_an_idle_victim, least_harm_counts_the_stall, all_down_is_unreachable,
         runner_with_matching_options, default_options_avoid_a_runner_with_others,
         other_options_load_a_fresh_runner_before_a_reload, options_known_from_api_ps,
         default_options_take_a_runner_known_from_api_ps, reload_when_nowhere_else,
         a_leaving_model_goes_to_its_other_copy, a_leaving_model_without_another_copy_is_held,
         a_leaving_model_may_load_where_it_fits, the_load_seen_ends_the_leaving,
         an_abandoned_load_ends_the_leaving]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_route(case):
    world, request, expected = case()
    assert world.route(*request) == expected


@pytest.mark.parametrize("allowed, down, full, expected", [
    (None, (), (), "ADMIT"),
    (bytearray([0, 1]), (), (), "ADMIT 1"),
    (bytearray([0, 1]), (), (1,), "WAIT 01"),
    (bytearray([0, 1]), (1,), (), "FAIL UNREACHABLE"),
])
def test_route_any(allowed, down, full, expected):
    w = World(2, cap=1)
    for i in down:
        w.table.set_health(i, False)
    for i in full:
        w.serve(A, i)
    got = short(w.router.route_any(allowed))
    assert got.startswith(expected) if expected == "ADMIT" else got == expected


# --- the directory's side of rule E ----------------------------------------------------------------------


@pytest.mark.parametrize("setup, evicts, victims", [
    # One model of room shown, one resident: a second one evicts it.
    (lambda w: w.catalogue(0, [A, X], [A]), True, {A}),
    # Room shown for two: no eviction.
    (lambda w: (w.catalogue(0, [A, B, X], [A, B]), w.catalogue(0, [A, B, X], [A])), False, set()),
    # Nothing resident: nothing to evict.
    (lambda w: w.catalogue(0, [X], []), False, set()),
    # Room never read (not polled): olb cannot tell, and does not guess.
    (lambda w: None, False, set()),
    # Its footprint known, free VRAM read: fits under 80 % of it.
    (lambda w: (w.catalogue(0, [A, X], [A]), w.models.footprint.__setitem__(X, 8 * GB),
                w.models.set_gpu_memory(0, 20 * GB, 1)), False, set()),
    (lambda w: (w.catalogue(0, [A, X], [A]), w.models.footprint.__setitem__(X, 8 * GB),
                w.models.set_gpu_memory(0, 9 * GB, 1)), True, {A}),
    # Two resident, one busy: Ollama takes an idle runner first (findRunnerToUnload).
    (lambda w: (w.catalogue(0, [A, B, X], [A, B]), w.serve(A, 0)), True, {B}),
    # Both busy: either may be the one it waits for.
    (lambda w: (w.catalogue(0, [A, B, X], [A, B]), w.serve(A, 0), w.serve(B, 0)), True, {A, B}),
])
def test_evicts_and_victims(setup, evicts, victims):
    w = World(1)
    setup(w)
    assert w.models.evicts(X, 0) is evicts
    if evicts:
        assert w.models.victims(X, 0) == victims


def test_leaving_lasts_from_the_placement_to_the_catalogue_that_shows_the_load():
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [A], [A])
    d = w.models
    assert d.warm_mask(A) is d.loaded_mask(A)  # nothing leaving: the live mask
    leaving(w)
    assert bytes(d.warm_mask(A)) == b"\x00\x01" and d.held(A)
    d.answered(X, 0)
    assert d.held(A)  # answered, but which model went is not known until /api/ps
    w.catalogue(0, [A, X], [X])
    assert not d.held(A) and bytes(d.loaded_mask(A)) == b"\x00\x01"
    leaving(w, B, 1)  # and a backend that goes down drops its pending loads
    assert d.held(A)
    d.forget(1)
    assert not d.held(A)


def test_runner_options_outlive_a_poll_during_their_load_not_an_unload():
    w = World(2).everywhere([A], {0: [A], 1: [A]})
    d = w.models
    d.mark_placed(A, 0, K8)              # a reload with num_ctx 8192 on its way
    w.everywhere([A], {1: [A]})          # a poll while it loads: not listed yet
    assert d.runners[A][0] == K8
    d.answered(A, 0, K8)
    w.everywhere([A], {1: [A]})          # listed no more after its answer: unloaded
    assert d.runners[A][0] is None


def test_queue_identity():
    def req(headers):
        return SimpleNamespace(header=lambda name: headers.get(name))
    assert queue_identity(req({}), "", "x-priority", b"10.0.0.1") == (b"ip:10.0.0.1", 0)
    assert queue_identity(req({b"authorization": b"Bearer k1", b"x-priority": b"Batch "}), "", "x-priority",
                          b"ip") == (b"key:k1", 1)
    assert queue_identity(req({b"x-client": b"team-a", b"authorization": b"Bearer k1"}), "x-client",
                          "x-priority", b"ip") == (b"team-a", 0)


def test_cold_decisions_are_counted():
    w = World().everywhere([A], {1: [A]})
    w.route(A)          # rule 1
    w.serve(A, 1, 1)
    w.queued[A] = 4     # past OLB_SPREAD_QUEUE: rules 2-5 run
    w.route(A)
    assert (w.router.decisions, w.router.cold_decisions) == (2, 1)


@pytest.mark.parametrize("mask, expected", [(None, "01"), (bytearray([1, 1]), "01"), (bytearray([1, 0]), "00")])
def test_not_leaving(mask, expected):
    w = World(2).catalogue(0, [A, X], [A]).catalogue(1, [A], [A])
    assert w.router.not_leaving(A, mask) is mask  # nothing leaving yet
    leaving(w)
    assert "".join(str(b) for b in w.router.not_leaving(A, mask)) == expected


@pytest.mark.parametrize("model, allowed, down, excluded, expected", [
    (None, None, (), None, "ADMIT 0"),                       # round the healthy backends, from the first
    (A, None, (), None, "ADMIT 1"),                          # only where it is installed
    (A, bytearray([1, 0, 1]), (), None, "FAIL UNREACHABLE"),  # ... and allowed
    (A, None, (1,), None, "FAIL UNREACHABLE"),
    (X, None, (), None, "FAIL MISSING"),                     # nowhere: Ollama's 404
    (X, None, (), bytearray(3), "FAIL UNREACHABLE"),         # a retry does not say 404
])
def test_route_no_slot(model, allowed, down, excluded, expected):
    w = World().catalogue(0, [B]).catalogue(1, [A]).catalogue(2, [B])
    for i in down:
        w.table.set_health(i, False)
    got = short(w.router.route_no_slot(model, allowed, excluded))
    assert got == expected
    if got.startswith("ADMIT"):
        assert w.table.inflight(int(got.split()[1])) == 0  # nothing counted


def test_pick_takes_turns():
    w = World()
    assert [w.router.pick() for _ in range(4)] == [0, 1, 2, 0]


# --- the queue: a placement it would make is decided again ---------------------------------------------------


class Waiter:
    """A queued request as the balancer sees one (proxy.Exchange's queue side)."""

    def __init__(self, model, allowed):
        self.model, self.allowed, self.runner, self.affinity, self.excluded = model, allowed, (), None, None
        self.admitted = []
        self.queue_timer = None

    def admit(self, index):
        self.admitted.append(index)

    def reroute(self):
        raise AssertionError("not expected")

    queue_expired = queue_evicted = reroute


@pytest.mark.parametrize("warm_elsewhere", [True, False])
def test_the_queue_does_not_place_on_a_stale_mask(loop, warm_elsewhere):
    """A request for x queued for backend 0 (it had room for x then). Now 0
    holds b, in demand, and x has become warm on 1, which is full: a slot on
    0 frees, but x waits for its warm backend rather than load a second copy
    on 0 and evict b. When 0 is the only backend that has x, the rules
    place it there all the same."""
    import dataclasses

    from olb import config as config_mod
    from olb.balancer import Balancer
    from olb.proxy import BackendSideProtocol

    cfg = dataclasses.replace(config_mod.Config(health_interval=0, gpu_poll=0),
                              backends=config_mod.parse_backends("http://127.0.0.1:1,http://127.0.0.1:2", 1))
    balancer = Balancer(cfg, loop, BackendSideProtocol)
    try:
        d = balancer.models
        d.set_catalogue(0, [{"name": X}, {"name": B}], [{"name": B, "size": GB, "size_vram": GB}])
        if warm_elsewhere:
            d.set_catalogue(1, [{"name": X}], [{"name": X, "size": GB, "size_vram": GB}])
        else:
            d.set_catalogue(1, [{"name": A}], [{"name": A, "size": GB, "size_vram": GB}])
        for _ in range(3):
            d.admitted(B, 0, 1)
            d.admitted(B, 0, -1)
        only = bytearray([0, 1])
        assert balancer.table.acquire(only) == 1  # 1 is full
        held = balancer.table.acquire(bytearray([1, 0]))  # so is 0, for now
        waiter = Waiter(X, bytearray([1, 0]))
        assert balancer.enqueue(waiter, b"client", 0) == 0  # QUEUED
        balancer.release(held)
        if warm_elsewhere:
            assert waiter.admitted == [] and bytes(waiter.allowed) == b"\x00\x01" and len(balancer.queue) == 1
            assert balancer.table.inflight(0) == 0
        else:
            assert waiter.admitted == [0] and len(balancer.queue) == 0
    finally:
        loop.run_until_complete(balancer.close())
