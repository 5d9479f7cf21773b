"""olb.fairqueue: service order, limits, priorities — no sockets."""

from olb.fairqueue import BATCH, FULL, INTERACTIVE, OVER_SHARE, QUEUED, FairQueue


class W:
    def __init__(self, name):
        self.name = name
        self.queue_key = None

    def __repr__(self):
        return self.name


def drain(q, admit=lambda w: True, limit=100):
    """Admit in service order; returns the names admitted."""
    out = []
    order = q.service_order()
    for w in order:
        if admit(w):
            q.remove(w)
            out.append(w.name)
            if len(out) >= limit:
                break
    return out


def test_round_robin_across_clients_fifo_within():
    q = FairQueue(100, 100)
    for i in range(4):
        q.push(W(f"a{i}"), "a")
    q.push(W("b0"), "b")
    q.push(W("c0"), "c")
    q.push(W("b1"), "b")
    assert drain(q) == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]
    assert len(q) == 0


def test_one_slot_at_a_time_still_alternates():
    q = FairQueue(100, 100)
    for i in range(5):
        q.push(W(f"a{i}"), "a")
    q.push(W("b0"), "b")
    first = drain(q, limit=1)
    second = drain(q, limit=1)
    assert [first, second] == [["a0"], ["b0"]]


def test_blocked_client_does_not_block_others():
    q = FairQueue(100, 100)
    q.push(W("a0"), "a")
    q.push(W("a1"), "a")
    q.push(W("b0"), "b")
    assert drain(q, admit=lambda w: not w.name.startswith("a")) == ["b0"]
    assert len(q) == 2  # a's line kept, in order
    assert drain(q) == ["a0", "a1"]


def test_interactive_overtakes_batch_without_starving_it():
    q = FairQueue(100, 100)
    for i in range(10):
        q.push(W(f"b{i}"), f"batch{i}", BATCH)
        q.push(W(f"i{i}"), f"int{i}", INTERACTIVE)
    order = drain(q)
    first_ten = order[:10]
    assert sum(n.startswith("i") for n in first_ten) >= 7
    assert any(n.startswith("b") for n in first_ten)  # batch still gets slots
    assert len(order) == 20


def test_limits_and_heaviest():
    q = FairQueue(3, 2)
    assert q.push(W("a0"), "a") == QUEUED
    assert q.push(W("a1"), "a") == QUEUED
    assert q.push(W("a2"), "a") == OVER_SHARE
    assert q.push(W("b0"), "b") == QUEUED
    assert q.push(W("c0"), "c") == FULL
    victim, count = q.heaviest()
    assert (victim.name, count) == ("a1", 2)
    assert q.queued_by("a") == 2 and q.clients() == 2


def test_remove_is_idempotent():
    q = FairQueue(10, 10)
    w = W("x")
    q.push(w, "c")
    assert q.remove(w) and not q.remove(w)
    assert len(q) == 0 and q.clients() == 0
