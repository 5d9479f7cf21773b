"""Flow control between the two sides of a proxied request.

Rules for this module: the only place that calls a transport's
pause_reading/resume_reading, and the only place that sets write-buffer
limits. Every call is idempotent and acts only on transitions.

Theory of operation
-------------------
A proxied request is two TCP connections glued together. Each direction has
one producer (the side we read from) and one consumer (the side we write to):

    backend --data_received--> olb --write--> client      (responses)
    client  --data_received--> olb --write--> backend     (request bodies)

When the consumer's transport buffers more than its high-water mark it calls
our protocol's pause_writing(); we then pause *reading* on the producer, so
the kernel's receive window fills and TCP pushes back on the producer itself
(a backend's token writes block; Ollama keeps generating into its own
buffer, not ours). resume_writing() — below the low-water mark — resumes it.
Memory per stream is therefore bounded by the write-buffer high-water mark
plus one read (uvloop reads at most 256 KiB at a time).

A transport's reading can be paused for several independent reasons at once
(the peer is slow; a pipelined request waits for the current response), so a
ReadGate keeps a set of reasons and the transport is paused while any is set.
Without that, one reason's resume would undo another's pause.
"""

from __future__ import annotations

#: The other side of the pair is not draining its writes.
PEER_SLOW = 1
#: A pipelined request is buffered; reading resumes when the response in
#: progress is done (h11 answers PAUSED until then).
PIPELINE = 2
#: A streamed request body (a blob upload) waits for its slowest consumer:
#: one of the backends it goes to has not taken what was read (manage.Fanout).
BODY = 4

#: Write-buffer high-water mark for client and backend transports, KiB. Small
#: on purpose: an open stream should cost tens of KiB, not megabytes; the
#: kernel's socket buffers add their own hundreds of KiB beneath it.
WRITE_HIGH_WATER = 32 * 1024


def set_write_limits(transport, high: int = WRITE_HIGH_WATER, low: int | None = None) -> None:
    """Set a transport's write-buffer watermarks (uvloop's flowcontrol rule).

    high >= low >= 0; low defaults to high // 4 so that pause/resume do not
    flap on every write around one threshold.
    """
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f"write limits need high >= low >= 0, got high={high} low={low}")
    transport.set_write_buffer_limits(high=high, low=low)


class ReadGate:
    """Pauses a transport's reading while at least one reason holds."""

    __slots__ = ("_transport", "reasons")

    def __init__(self, transport):
        self._transport = transport
        self.reasons = 0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self._transport.pause_reading()
        self.reasons |= reason

    def resume(self, reason: int) -> None:
        if not self.reasons & reason:
            return
        self.reasons &= ~reason
        if not self.reasons and not self._transport.is_closing():
            self._transport.resume_reading()

    @property
    def paused(self) -> bool:
        return self.reasons != 0


class TimedReadGate(ReadGate):
    """A ReadGate that tells its owner how long each pause lasted.

    A backend's silence is timed only while olb reads from it (its idle and
    first-byte timers, proxy.BackendSideProtocol): a pause because the
    client does not drain its writes is the client's doing, so the owner
    moves its clocks on by the paused time when reading resumes.
    """

    __slots__ = ("_paused_at", "_on_resume", "_clock")

    def __init__(self, transport, clock, on_resume):
        super().__init__(transport)
        self._clock = clock
        self._on_resume = on_resume
        self._paused_at = 0.0

    def pause(self, reason: int) -> None:
        if not self.reasons:
            self._paused_at = self._clock()
        super().pause(reason)

    def resume(self, reason: int) -> None:
        if not self.reasons & reason:
            return
        super().resume(reason)
        if not self.reasons:
            self._on_resume(self._clock() - self._paused_at)
