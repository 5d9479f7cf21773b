# cython: annotation_typing=False, boundscheck=True, wraparound=True, cdivision=False
"""The admission queue: fair across clients, with an interactive/batch priority.

Rules for this module: a data structure and its service order, nothing
else — no sockets, no timers, no backend choice (the balancer asks the core
whether a waiter can be admitted).

Theory of operation
-------------------
Waiting requests are grouped by client (an API key, a configured header, or
the client's address) and by class (interactive, the default, or batch).
Within a client, requests keep their arrival order. Across clients, service
is round-robin: each pass offers one slot to the head of every client's line
in turn, so a client with 500 queued requests and a client with one are
served alternately, not in arrival order — one heavy user cannot starve the
others (deficit round-robin with a quantum of one request: requests are
alike enough in admission cost, each takes one slot).

Across classes, interactive lines are offered INTERACTIVE_WEIGHT slots for
each slot offered to batch lines while both wait, so interactive traffic
overtakes batch traffic without starving it.

A waiter whose admission mask found no free backend in the current pass
blocks only its own client's line (per-client FIFO) for that pass.

Limits: the queue holds at most `size` waiters, and one client at most
`per_client` of them (beyond it: 429, over its share). When the queue is
full, a newcomer that holds fewer waiters than the heaviest client takes the
place of that client's newest waiter (which gets 429): a flood from one
client cannot lock the others out of the queue. Otherwise a full queue is
everybody's problem (503).
"""

from __future__ import annotations

import collections

INTERACTIVE = 0
BATCH = 1
#: Slots offered to interactive lines per slot offered to batch lines.
INTERACTIVE_WEIGHT = 4

#: enqueue() results.
QUEUED = 0
FULL = 1
OVER_SHARE = 2


class FairQueue:

    def __init__(self, size: int, per_client: int):
        self.size = size
        self.per_client = per_client
        # One ordered dict of client -> deque per class; the dict's order is
        # the round-robin order (a served client moves to the end).
        self._lines: tuple[collections.OrderedDict, collections.OrderedDict] = (
            collections.OrderedDict(), collections.OrderedDict())
        self._count = 0
        self._per_client: collections.Counter = collections.Counter()
        self._turn = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def push(self, waiter, client, priority: int = INTERACTIVE) -> int:
        """Queue a waiter; QUEUED, FULL or OVER_SHARE."""
        if self._count >= self.size:
            return FULL
        if self._per_client[client] >= self.per_client:
            return OVER_SHARE
        lines = self._lines[priority]
        line = lines.get(client)
        if line is None:
            line = lines[client] = collections.deque()
        line.append(waiter)
        waiter.queue_key = (priority, client)
        self._per_client[client] += 1
        self._count += 1
        return QUEUED

    def remove(self, waiter) -> bool:
        """Take a waiter out (admitted, expired, or its client left)."""
        key = getattr(waiter, "queue_key", None)
        if key is None:
            return False
        priority, client = key
        lines = self._lines[priority]
        line = lines.get(client)
        if line is None:
            return False
        try:
            line.remove(waiter)
        except ValueError:
            return False
        if line:
            lines.move_to_end(client)  # served: to the back of the rotation
        else:
            del lines[client]
        waiter.queue_key = None
        self._count -= 1
        self._per_client[client] -= 1
        if not self._per_client[client]:
            del self._per_client[client]
        return True

    def service_order(self):
        """Yield waiters in the order they should be offered a slot.

        The caller admits (remove()) or skips each; a skipped waiter's client
        is not offered again in this pass (its line keeps FIFO order).
        remove() moves the client to the back of its class's rotation, so
        the order survives a pass cut short.
        """
        blocked: set = set()
        while self._count:
            priority = self._next_class(blocked)
            if priority is None:
                return
            lines = self._lines[priority]
            client = next((c for c in lines if (priority, c) not in blocked), None)
            if client is None:
                continue
            waiter = lines[client][0]
            yield waiter
            if waiter.queue_key is not None:  # not admitted: skip this line now
                blocked.add((priority, client))

    def _next_class(self, blocked):
        """Weighted round-robin between the classes that have offerable lines."""
        open_classes = [p for p in (INTERACTIVE, BATCH)
                        if any((p, c) not in blocked for c in self._lines[p])]
        if not open_classes:
            return None
        if len(open_classes) == 1:
            return open_classes[0]
        self._turn = (self._turn + 1) % (INTERACTIVE_WEIGHT + 1)
        return BATCH if self._turn == 0 else INTERACTIVE

    def heaviest(self):
        """The newest waiter of the client holding the most waiters, and that count."""
        if not self._per_client:
            return None, 0
        client, count = self._per_client.most_common(1)[0]
        for lines in self._lines:
            line = lines.get(client)
            if line:
                return line[-1], count
        return None, 0

    def clients(self) -> int:
        return len(self._per_client)

    def queued_by(self, client) -> int:
        return self._per_client.get(client, 0)

    def waiters(self):
        """Every (waiter, client) waiting, interactive lines first (for status pages, not the hot path)."""
        for lines in self._lines:
            for client, line in lines.items():
                for waiter in line:
                    yield waiter, client

    def waiting(self):
        """Yield (class, model) of every waiter (for the queue-depth gauge, at scrape time)."""
        for priority, lines in enumerate(self._lines):
            for line in lines.values():
                for waiter in line:
                    yield priority, getattr(waiter, "model", None)
