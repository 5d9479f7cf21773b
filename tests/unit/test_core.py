"""BackendTable: differential tests against a pure-Python reference, invariants,
tie-breaking, GPU load, and counters shared across tables and processes."""

import math
import mmap
import os
import random

import pytest

from olb._core import NO_BACKEND, BackendTable, shared_size


class RefTable:
    """Pure-Python model of BackendTable's least_loaded policy.

    Returns the *set* of equal-best candidates, since the table breaks ties at
    random.  The products are taken in the same order as _core.pyx's
    _update_denom, so equal scores are equal doubles in both.
    """

    FLOOR = 0.5

    def __init__(self, capacities, weights=None):
        self.capacity = list(capacities)
        self.weight = list(weights) if weights is not None else [1.0] * len(self.capacity)
        self.inflight = [0] * len(self.capacity)
        self.healthy = [True] * len(self.capacity)
        self.util = [None] * len(self.capacity)

    def candidates(self, allowed=None):
        scores = {}
        for i, cap in enumerate(self.capacity):
            if not self.healthy[i] or (allowed is not None and not allowed[i]):
                continue
            if self.inflight[i] >= cap:
                continue
            headroom = 1.0 if self.util[i] is None else max(self.FLOOR, 1.0 - self.util[i])
            scores[i] = (self.inflight[i] + 1) / (cap * self.weight[i] * headroom)
        if not scores:
            return set()
        best = min(scores.values())
        return {i for i, s in scores.items() if s == best}


def check_counts(table, ref):
    for i in range(table.n):
        assert table.inflight(i) == ref.inflight[i]
        assert 0 <= table.inflight(i) <= ref.capacity[i]


# -- differential ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_under_random_operations(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 12)
    caps = [rng.randint(1, 5) for _ in range(n)]
    # Mostly "nice" weights so that exact ties are common, some arbitrary.
    weights = [rng.choice([1.0, 1.0, 2.0, 0.5, 1.5, rng.uniform(0.1, 3.0)]) for _ in range(n)]
    caps[1], weights[1] = caps[0], weights[0]  # so that ties can always happen
    table = BackendTable(caps, weights, seed=seed)
    ref = RefTable(caps, weights)
    held = []
    tie_picks = 0

    for _ in range(4000):
        op = rng.random()
        if op < 0.5:
            allowed = None
            if rng.random() < 0.3:
                allowed = bytes(rng.choice([0, 1, 7]) for _ in range(n))
            expected = ref.candidates(allowed)
            got = table.acquire(allowed)
            if not expected:
                assert got == NO_BACKEND
            else:
                assert got in expected
                tie_picks += len(expected) > 1
                ref.inflight[got] += 1
                held.append(got)
        elif op < 0.8:
            if held:
                index = held.pop(rng.randrange(len(held)))
                table.release(index)
                ref.inflight[index] -= 1
        elif op < 0.88:
            index = rng.randrange(n)
            healthy = rng.random() < 0.7
            table.set_health(index, healthy)
            ref.healthy[index] = healthy
        elif op < 0.95:
            index = rng.randrange(n)
            util = rng.choice([0.0, 0.5, 0.9, 0.97, 1.0, rng.random()])
            table.set_gpu_load(index, util, rng.random())
            ref.util[index] = util
        else:
            index = rng.randrange(n)
            table.clear_gpu_load(index)
            ref.util[index] = None
        check_counts(table, ref)

    while held:
        table.release(held.pop())
    assert all(table.inflight(i) == 0 for i in range(n))
    assert tie_picks > 0, "the sequence never exercised tie-breaking"


def test_served_counts_releases():
    table = BackendTable([2, 2], seed=1)
    a, b = table.acquire(), table.acquire()
    assert {a, b} == {0, 1}
    table.release(a)
    table.release(b)
    table.release(table.acquire())
    assert table.served(0) + table.served(1) == 3


# -- invariants -----------------------------------------------------------------


def test_capacity_is_never_exceeded_and_full_means_no_backend():
    table = BackendTable([1, 3, 2], seed=7)
    picks = [table.acquire() for _ in range(6)]
    assert sorted(picks) == [0, 1, 1, 1, 2, 2]
    assert table.acquire() == NO_BACKEND
    assert [table.inflight(i) for i in range(3)] == [1, 3, 2]
    table.release(1)
    assert table.acquire() == 1
    assert table.acquire() == NO_BACKEND


def test_release_of_idle_backend_raises_and_changes_nothing():
    table = BackendTable([2, 2], seed=3)
    with pytest.raises(ValueError, match="no request in flight"):
        table.release(0)
    index = table.acquire()
    table.release(index)
    with pytest.raises(ValueError, match="no request in flight"):
        table.release(index)
    assert table.inflight(index) == 0
    assert table.served(index) == 1


def test_no_backend_when_all_unhealthy():
    table = BackendTable([4, 4, 4], seed=1)
    for i in range(3):
        table.set_health(i, False)
        assert not table.is_healthy(i)
    assert table.acquire() == NO_BACKEND
    table.set_health(2, True)
    assert table.is_healthy(2)
    assert table.acquire() == 2


def test_allowed_mask_filters_and_all_disallowed_is_no_backend():
    table = BackendTable([4, 4, 4], seed=1)
    assert table.acquire(bytes(3)) == NO_BACKEND
    assert table.acquire(b"\x00\x00\x01") == 2
    assert table.acquire(bytearray(b"\x00\x05\x00")) == 1
    assert table.acquire(memoryview(b"\x00\x00\x01")) == 2
    with pytest.raises(ValueError, match="3 backends"):
        table.acquire(b"\x01\x01")
    with pytest.raises(TypeError):
        table.acquire([1, 1, 1])


def test_unhealthy_backend_keeps_its_in_flight_until_released():
    table = BackendTable([1], seed=1)
    assert table.acquire() == 0
    table.set_health(0, False)
    table.release(0)
    assert table.inflight(0) == 0


def test_index_errors():
    table = BackendTable([1, 1])
    for method in (table.release, table.is_healthy, table.clear_gpu_load,
                   table.inflight, table.served):
        with pytest.raises(IndexError):
            method(2)
        with pytest.raises(IndexError):
            method(-1)
    with pytest.raises(IndexError):
        table.set_health(5, True)
    with pytest.raises(IndexError):
        table.set_gpu_load(5, 0.5, 0.5)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        (([],), {}, "at least one backend"),
        (([1, 0],), {}, "capacity must be >= 1"),
        (([1, 1], [1.0]), {}, "1 weights for 2 backends"),
        (([1, 1], [1.0, 0.0]), {}, "weight must be finite and > 0"),
        (([1, 1], [1.0, -2.0]), {}, "weight must be finite and > 0"),
        (([1], [math.inf]), {}, "weight must be finite and > 0"),
        (([1], [math.nan]), {}, "weight must be finite and > 0"),
        (([1],), {"workers": 0}, "workers must be >= 1"),
        (([1],), {"worker": 1, "workers": 1}, r"worker must be in range\(1\)"),
        (([1],), {"worker": -1, "workers": 2}, r"worker must be in range\(2\)"),
        (([1],), {"policy": "random"}, "unknown policy 'random'; known: least_loaded, round_robin"),
        (([1],), {"shared": b"\x00" * 64}, "writable"),
        (([1, 1],), {"shared": bytearray(47)}, "need 48"),
    ],
)
def test_constructor_rejects_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BackendTable(*args, **kwargs)


def test_constructor_rejects_non_integer_capacity_and_misaligned_buffer():
    with pytest.raises(TypeError):
        BackendTable([1.5])
    raw = bytearray(shared_size(1, 1) + 8)
    with pytest.raises(ValueError, match="aligned"):
        BackendTable([1], shared=memoryview(raw)[1 : 1 + shared_size(1, 1)])


def test_shared_size():
    assert shared_size(4, 1) == 8 * 4 * 3
    assert shared_size(3, 8) == 8 * 3 * 10
    with pytest.raises(ValueError):
        shared_size(0, 1)
    with pytest.raises(ValueError):
        shared_size(1, 0)


def test_snapshot():
    table = BackendTable([2, 3], [1.0, 2.5], seed=1)
    table.set_gpu_load(1, 0.25, 0.75)
    table.set_health(0, False)
    index = table.acquire()
    assert index == 1
    assert table.n == 2
    assert table.snapshot() == [
        {"inflight": 0, "local_inflight": 0, "capacity": 2, "weight": 1.0, "healthy": False,
         "gpu_util": None, "gpu_mem_free": None, "served": 0},
        {"inflight": 1, "local_inflight": 1, "capacity": 3, "weight": 2.5, "healthy": True,
         "gpu_util": 0.25, "gpu_mem_free": 0.75, "served": 0},
    ]


# -- the policy -----------------------------------------------------------------


def test_capacities_1_2_4_fill_proportionally():
    caps = [10, 20, 40]
    table = BackendTable(caps, seed=11)
    for k in range(1, 11):
        for _ in range(7):
            assert table.acquire() != NO_BACKEND
            fill = [table.inflight(i) / caps[i] for i in range(3)]
            # Greedy on (inflight + 1) / capacity never lets one backend's
            # fill run more than one request ahead of another's.
            assert max(fill) - min(fill) <= 1 / min(caps) + 1e-12
        assert [table.inflight(i) for i in range(3)] == [k, 2 * k, 4 * k]
    assert table.acquire() == NO_BACKEND


def test_weights_scale_the_share():
    table = BackendTable([100, 100, 100], [1.0, 2.0, 4.0], seed=5)
    for _ in range(70):
        table.acquire()
    assert [table.inflight(i) for i in range(3)] == [10, 20, 40]


def test_ties_are_broken_uniformly():
    # Five equal backends, acquire+release 50,000 times: each pick is a
    # five-way tie.  Expected 10,000 each, sd = sqrt(50000 * 0.2 * 0.8) ~ 89.
    # The seed is fixed, so this cannot flake; the bounds (5 sd, and a
    # chi-square at p ~ 1e-4) would still hold for almost any seed.
    table = BackendTable([8] * 5, seed=20240601)
    counts = [0] * 5
    for _ in range(50_000):
        index = table.acquire()
        counts[index] += 1
        table.release(index)
    assert all(abs(c - 10_000) < 450 for c in counts), counts
    chi2 = sum((c - 10_000) ** 2 / 10_000 for c in counts)
    assert chi2 < 23.5, (chi2, counts)  # 4 degrees of freedom, p ~ 1e-4


def test_ties_among_a_subset_are_uniform_and_exclude_the_rest():
    # Backend 0 is busier, backend 4 disallowed: ties among 1, 2, 3 only.
    table = BackendTable([8] * 5, seed=99)
    table.acquire(b"\x01\x00\x00\x00\x00")
    counts = [0] * 5
    allowed = b"\x01\x01\x01\x01\x00"
    for _ in range(30_000):
        index = table.acquire(allowed)
        counts[index] += 1
        table.release(index)
    assert counts[0] == counts[4] == 0
    assert all(abs(c - 10_000) < 400 for c in counts[1:4]), counts


def test_same_seed_same_choices():
    def picks(seed):
        table = BackendTable([3] * 6, seed=seed)
        return [table.acquire() for _ in range(18)]

    assert picks(42) == picks(42)
    assert picks(42) != picks(43)
    assert sorted(picks(None)) == sorted(list(range(6)) * 3)


def test_busy_gpu_is_avoided_until_its_score_catches_up():
    table = BackendTable([8, 8], seed=1)
    table.set_gpu_load(0, 0.9, 0.5)
    # Backend 0 scores as if half its size (headroom capped at 2x): (n + 1) / 4
    # against backend 1's (m + 1) / 8. Whatever order ties break in, nine
    # requests end 3 : 6, and the idle GPU takes the first.
    picks = [table.acquire() for _ in range(9)]
    assert picks[0] == 1
    assert (picks.count(0), picks.count(1)) == (3, 6)
    for index in picks:
        table.release(index)
    table.clear_gpu_load(0)
    assert table.snapshot()[0]["gpu_util"] is None
    # Neutral again: equal shares.
    picks = [table.acquire() for _ in range(8)]
    assert (picks.count(0), picks.count(1)) == (4, 4)


def test_saturated_gpu_is_penalised_not_excluded():
    table = BackendTable([1], seed=1)
    table.set_gpu_load(0, 1.0, 0.0)
    assert table.acquire() == 0


def test_free_memory_is_recorded_but_not_scored():
    table = BackendTable([8, 8], seed=2)
    table.set_gpu_load(0, 0.3, 0.01)
    table.set_gpu_load(1, 0.3, 0.99)
    seen = set()
    for _ in range(200):
        index = table.acquire()
        seen.add(index)
        table.release(index)
    assert seen == {0, 1}
    assert table.snapshot()[0]["gpu_mem_free"] == 0.01


@pytest.mark.parametrize("util, mem", [(-0.01, 0.5), (1.01, 0.5), (math.nan, 0.5),
                                       (0.5, -0.1), (0.5, 1.5), (0.5, math.nan)])
def test_set_gpu_load_validates(util, mem):
    table = BackendTable([1])
    with pytest.raises(ValueError, match="must be in"):
        table.set_gpu_load(0, util, mem)


# -- the round_robin policy -------------------------------------------------------


def test_round_robin_rotates_in_order_regardless_of_load_and_weight():
    # least_loaded would send the 2nd..4th requests to the heavy, idle backend 2.
    table = BackendTable([8, 8, 8], [1.0, 1.0, 10.0], policy="round_robin", seed=1)
    table.set_gpu_load(0, 1.0, 0.0)  # a saturated GPU is not scored either
    assert [table.acquire() for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_full_unhealthy_and_disallowed_without_losing_its_place():
    table = BackendTable([1, 4, 4, 4], policy="round_robin")
    assert table.acquire() == 0          # backend 0 is now full
    table.set_health(2, False)
    assert [table.acquire() for _ in range(3)] == [1, 3, 1]   # 0 full, 2 down
    table.release(0)
    assert table.acquire() == 3          # the cursor is past 1: 3 comes before 0
    assert table.acquire() == 0
    allowed = bytearray([1, 0, 1, 1])
    table.set_health(2, True)
    assert [table.acquire(allowed) for _ in range(3)] == [2, 3, 2]  # 0 full again, 1 not allowed
    assert table.acquire(bytearray(4)) == NO_BACKEND


def test_round_robin_capacity_holds_and_full_means_no_backend():
    caps = [1, 2, 3]
    table = BackendTable(caps, policy="round_robin")
    picks = [table.acquire() for _ in range(6)]
    assert sorted(picks) == [0, 1, 1, 2, 2, 2]
    assert table.acquire() == NO_BACKEND
    assert [table.inflight(i) for i in range(3)] == caps
    table.release(1)
    assert table.acquire() == 1 and table.acquire() == NO_BACKEND


def test_round_robin_spreads_evenly_under_acquire_release():
    table = BackendTable([4] * 5, policy="round_robin")
    for _ in range(1000):
        table.release(table.acquire())
    assert [table.served(i) for i in range(5)] == [200] * 5


def test_round_robin_with_shared_counters_never_exceeds_capacity(shared_buffer):
    buf = shared_buffer(2, 2)
    w0 = BackendTable([1, 2], shared=buf, worker=0, workers=2, policy="round_robin")
    w1 = BackendTable([1, 2], shared=buf, worker=1, workers=2, policy="round_robin")
    assert w0.acquire() == 0
    assert w1.acquire() == 1             # its cursor says 0, but w0 filled it
    assert w1.acquire() == 1
    assert w0.acquire() == NO_BACKEND and w1.acquire() == NO_BACKEND
    del w0, w1


# -- shared counters --------------------------------------------------------------


@pytest.fixture
def shared_buffer():
    buffers = []

    def make(n_backends, n_workers):
        buf = mmap.mmap(-1, shared_size(n_backends, n_workers))
        buffers.append(buf)
        return buf

    yield make
    for buf in buffers:
        buf.close()  # fails with BufferError if a table still pins it


def test_two_tables_over_one_buffer_share_counts_and_capacity(shared_buffer):
    buf = shared_buffer(2, 2)
    w0 = BackendTable([1, 1], shared=buf, worker=0, workers=2, seed=1)
    w1 = BackendTable([1, 1], shared=buf, worker=1, workers=2, seed=2)
    a = w0.acquire()
    assert w1.inflight(a) == 1
    b = w1.acquire()
    assert b == 1 - a  # w1 saw w0's request
    assert w0.acquire() == NO_BACKEND
    assert w1.acquire() == NO_BACKEND
    assert [row["local_inflight"] for row in w0.snapshot()][a] == 1
    assert [row["local_inflight"] for row in w1.snapshot()][a] == 0
    with pytest.raises(ValueError):
        w1.release(a)  # w0's request: not w1's to release
    w1.release(b)
    assert w0.inflight(b) == 0
    assert w0.served(b) == 1
    assert w0.acquire() == b
    del w0, w1


def test_reclaim_worker(shared_buffer):
    buf = shared_buffer(3, 3)
    supervisor_view = BackendTable([4, 4, 4], shared=buf, worker=0, workers=3)
    dead = BackendTable([4, 4, 4], shared=buf, worker=1, workers=3, seed=1)
    alive = BackendTable([4, 4, 4], shared=buf, worker=2, workers=3, seed=2)
    for _ in range(5):
        dead.acquire()
    for _ in range(3):
        alive.acquire()
    assert sum(supervisor_view.inflight(i) for i in range(3)) == 8
    assert supervisor_view.reclaim_worker(1) == 5
    assert sum(supervisor_view.inflight(i) for i in range(3)) == 3
    assert supervisor_view.reclaim_worker(1) == 0
    # The reclaimed worker's releases are refused; totals never go negative.
    with pytest.raises(ValueError):
        dead.release(0)
    assert all(alive.inflight(i) >= 0 for i in range(3))
    with pytest.raises(ValueError, match="range"):
        supervisor_view.reclaim_worker(3)
    del supervisor_view, dead, alive


def test_table_pins_the_mmap(shared_buffer):
    buf = shared_buffer(1, 1)
    table = BackendTable([1], shared=buf)
    with pytest.raises(BufferError):
        buf.close()
    del table  # the fixture's close() now succeeds


def test_forked_worker_counts_are_seen_and_reclaimed(shared_buffer):
    buf = shared_buffer(3, 2)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            child = BackendTable([2, 2, 2], shared=buf, worker=1, workers=2)
            picks = [child.acquire() for _ in range(4)]
            code = 0 if NO_BACKEND not in picks else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    parent = BackendTable([2, 2, 2], shared=buf, worker=0, workers=2)
    assert sum(parent.inflight(i) for i in range(3)) == 4
    assert parent.acquire() != NO_BACKEND
    assert parent.acquire() != NO_BACKEND
    assert parent.acquire() == NO_BACKEND  # 6 slots: 4 held by the dead child
    assert parent.reclaim_worker(1) == 4
    assert sum(parent.inflight(i) for i in range(3)) == 2
    del parent


def test_concurrent_workers_never_exceed_capacity(shared_buffer):
    # Four processes race acquire/release on two small backends; each checks
    # after every acquire that the shared total is within capacity.
    workers, rounds, caps = 4, 20_000, [2, 3]
    buf = shared_buffer(len(caps), workers)
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                table = BackendTable(caps, shared=buf, worker=w, workers=workers)
                held = []
                ok = True
                for r in range(rounds):
                    index = table.acquire()
                    if index != NO_BACKEND:
                        ok &= 0 < table.inflight(index) <= caps[index]
                        held.append(index)
                    if held and (len(held) > 1 or r % 3 == 0):
                        table.release(held.pop(0))
                for index in held:
                    table.release(index)
                code = 0 if ok else 3
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    table = BackendTable(caps, shared=buf, worker=0, workers=workers)
    assert [table.inflight(i) for i in range(len(caps))] == [0, 0]
    assert table.served(0) + table.served(1) > 0
    del table


# --- acquire_affine: consistent hashing with bounded loads ------------------------------


def test_affine_same_key_same_backend_when_idle():
    table = BackendTable([4] * 8, seed=1)
    first = table.acquire_affine(0xABCDEF)
    table.release(first)
    for _ in range(20):
        index = table.acquire_affine(0xABCDEF)
        assert index == first
        table.release(index)


def test_affine_keys_spread_over_backends():
    table = BackendTable([4] * 8, seed=1)
    homes = set()
    for key in range(200):
        index = table.acquire_affine(key * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
        homes.add(index)
        table.release(index)
    assert homes == set(range(8))


def test_affine_respects_the_load_bound_and_capacity():
    table = BackendTable([8, 8], seed=1)
    held = [table.acquire_affine(7) for _ in range(8)]
    # Bounded loads: one key cannot pile everything on its home backend.
    counts = sorted([table.inflight(0), table.inflight(1)])
    assert counts[0] >= 3, counts
    for index in held:
        table.release(index)
    full = BackendTable([1, 1], seed=1)
    a, b = full.acquire_affine(7), full.acquire_affine(7)
    assert {a, b} == {0, 1}
    assert full.acquire_affine(7) == NO_BACKEND


def test_affine_honours_allowed_and_health():
    table = BackendTable([4] * 4, seed=1)
    home = table.acquire_affine(99)
    table.release(home)
    allowed = bytearray(b"\x01" * 4)
    allowed[home] = 0
    other = table.acquire_affine(99, allowed)
    assert other != home
    table.release(other)
    table.set_health(other, False)
    assert table.acquire_affine(99, allowed) not in (home, other)
    with pytest.raises(ValueError):
        table.acquire_affine(99, bound=0.5)
    with pytest.raises(ValueError):
        table.acquire_affine(99, b"\x01")


def test_affine_moves_few_keys_when_a_backend_leaves():
    """Rendezvous hashing: removing one of 8 backends re-homes only its keys."""
    table = BackendTable([4] * 8, seed=1)

    def homes():
        out = []
        for key in range(400):
            index = table.acquire_affine(key * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF)
            out.append(index)
            table.release(index)
        return out

    before = homes()
    table.set_health(3, False)
    after = homes()
    moved = [b for b, a in zip(before, after) if a != b]
    assert moved and set(moved) == {3}
