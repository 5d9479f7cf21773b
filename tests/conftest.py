"""Shared fixtures.

No pytest-asyncio: a `loop` fixture hands out a fresh uvloop loop and tests
drive it with run_until_complete (uvloop's own test base does the same).
`LoopThread` runs a loop in a background thread for tests that drive the
official synchronous clients (ollama, openai) against servers on that loop.
"""

import asyncio
import concurrent.futures
import threading

import pytest
import uvloop


@pytest.fixture
def loop():
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        yield loop
    finally:
        # Cancel whatever a failing test left behind, then close cleanly.
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
    assert not errors, f"unexpected errors reached the loop's exception handler: {errors}"


class LoopThread:
    """An event loop running in a daemon thread; `run(coro)` waits for a result."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.errors = []
        self.loop.set_exception_handler(lambda lp, ctx: self.errors.append(ctx))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args):
        """Run a plain function on the loop thread and return its result."""
        fut = concurrent.futures.Future()

        def _call():
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed back to the caller
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(_call)
        return fut.result(10)

    def close(self):
        async def _cancel_all():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()
    assert not lt.errors, f"unexpected errors reached the loop's exception handler: {lt.errors}"
