"""A thread submitting in a tight loop yields the GIL to the cluster's event loop every
``PACE`` submissions (clusterpy._submit), so jobs are dispatched while it submits; the loop
thread and coroutines are never made to wait.

The SubmitQueue is driven directly, with a real event loop in its own thread (no sockets).
The interpreter's switch interval is raised for these tests, so that without pacing the
loop thread could not get the GIL at all while the submitter runs: the tests then fail.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from clusterpy._submit import PACE, LoopInbox, SubmitQueue

from .test_backpressure import inbox  # noqa: F401 (fixture: the inbox of a loop that never runs)


@pytest.fixture
def no_forced_switch():
    """No GIL hand-off forced by the interpreter while the test runs (1 s instead of 5 ms)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    yield
    sys.setswitchinterval(before)


@pytest.fixture
def running_inbox():
    """A loop running in a thread of its own, and its inbox (made before it runs)."""
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield inbox
    inbox.call(loop.stop)
    thread.join(5)
    inbox.close()
    loop.close()


def test_a_submitting_thread_lets_the_loop_drain_every_pace_items(running_inbox, no_forced_switch):
    batches: list[list[int]] = []
    queue = SubmitQueue(running_inbox, batches.append, limit=None)
    total = PACE * 10
    for i in range(total):  # a tight loop holding the GIL, as `[cluster.submit(x) for x in ...]`
        queue.put(i, on_orphaned=lambda items: None)
    done = threading.Event()
    running_inbox.call(done.set)
    assert done.wait(5)
    assert [i for batch in batches for i in batch] == list(range(total))  # all, in order
    # Without pacing the loop thread never ran during the loop above: one batch of 640.
    assert len(batches) >= 9, [len(b) for b in batches]
    assert max(len(b) for b in batches) <= 2 * PACE


def test_the_loop_thread_is_never_made_to_wait(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=None)
    queue.bind_loop_thread()  # this thread plays the loop thread (a future's done callback)
    start = time.monotonic()
    for i in range(PACE * 10):
        queue.put(i, on_orphaned=lambda items: None)
    assert time.monotonic() - start < 0.25  # pacing would wait up to 50 ms every PACE items


def test_a_coroutine_is_never_made_to_wait(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=None)  # the cluster's, not running

    async def submit_many() -> float:  # in another event loop, as submit_async's callers are
        start = time.monotonic()
        for i in range(PACE * 10):
            queue.put(i, on_orphaned=lambda items: None)
        return time.monotonic() - start

    assert asyncio.run(submit_many()) < 0.25


def test_a_loop_that_never_drains_does_not_hold_a_submitter_for_long(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=None)  # a cluster closing under the submitter
    start = time.monotonic()
    for i in range(PACE * 3):
        queue.put(i, on_orphaned=lambda items: None)
    assert time.monotonic() - start < 2  # a bounded wait per PACE items, then it goes on
    assert len(queue._items) == PACE * 3
