"""The LoopInbox (clusterpy._submit): the one way into a cluster's event loop from other threads.

Driven directly, with a real event loop in a thread of its own (calls in the order asked, from
several threads and from the loop thread itself; a failing call; coroutines and their
cancellation; closing; submissions the loop took in but never ran, orphaned rather than lost),
then through a JobCluster against a real node: a cancel right behind its submission always
finds the job, round trips from several threads, submissions from the loop thread.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy._submit import LoopInbox, SubmitQueue
from clusterpy.errors import ClusterClosedError


def inc(x):
    return x + 1


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


class RunningLoop:
    """An event loop running in a thread of its own, and its inbox (made before it runs)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.errors.append(context))
        self.inbox = LoopInbox(self.loop)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def barrier(self) -> None:
        """Return once every call asked so far has run."""
        done = threading.Event()
        self.inbox.call(done.set)
        assert done.wait(5)

    def close(self) -> None:
        self.inbox.call(self.loop.stop)
        self.thread.join(5)
        self.inbox.close()
        self.loop.close()


@pytest.fixture
def running():
    running = RunningLoop()
    yield running
    running.close()


def test_calls_run_in_the_loop_thread_in_the_order_each_thread_asked(running):
    seen: list[tuple[int, int]] = []
    threads_seen: set[int] = set()

    def record(t: int, i: int) -> None:
        threads_seen.add(threading.get_ident())
        seen.append((t, i))

    def ask(t: int) -> None:
        for i in range(300):
            running.inbox.call(record, t, i)

    threads = [threading.Thread(target=ask, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    running.barrier()
    assert threads_seen == {running.thread.ident}
    assert sorted(seen) == [(t, i) for t in range(4) for i in range(300)]  # each once
    for t in range(4):
        assert [i for u, i in seen if u == t] == list(range(300))  # in the order asked


def test_a_call_the_loop_thread_asks_for_runs_in_a_later_turn(running):
    order: list[str] = []

    def first() -> None:
        running.loop.call_soon(order.append, "next turn")
        running.inbox.call(order.append, "asked by the loop thread")
        order.append("first")

    running.inbox.call(first)
    running.barrier()
    running.barrier()
    assert order == ["first", "next turn", "asked by the loop thread"]


def test_a_failing_call_goes_to_the_exception_handler_and_the_next_calls_run(running):
    ran: list[int] = []

    def boom() -> None:
        raise ValueError("boom")

    running.inbox.call(ran.append, 1)
    running.inbox.call(boom)
    running.inbox.call(ran.append, 2)
    running.barrier()
    assert ran == [1, 2]
    assert len(running.errors) == 1 and isinstance(running.errors[0]["exception"], ValueError)


def test_run_gives_a_coroutines_outcome_and_cancelling_it_cancels_the_task(running):
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    async def fail() -> None:
        raise KeyError("k")

    assert running.inbox.run(add(2, 3)).result(5) == 5
    with pytest.raises(KeyError):
        running.inbox.run(fail()).result(5)

    started, cancelled = threading.Event(), threading.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    future = running.inbox.run(forever())
    assert started.wait(5)
    assert future.cancel()
    assert cancelled.wait(5)  # the task in the loop was cancelled too
    assert running.errors == []


def test_a_closed_inbox_refuses_calls_and_releases_its_sockets():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    inbox.close()
    inbox.close()  # idempotent
    assert inbox.closed and inbox._reader.fileno() == -1 and inbox._writer.fileno() == -1
    with pytest.raises(RuntimeError):
        inbox.call(print)

    async def never() -> None:
        raise AssertionError("never runs")

    coro = never()
    with pytest.raises(RuntimeError):
        inbox.run(coro)
    assert coro.cr_frame is None  # closed, not left "never awaited"
    loop.close()

    closed_loop = asyncio.new_event_loop()
    closed_loop.close()
    assert LoopInbox(closed_loop).closed  # a closed loop makes a closed inbox


def test_submissions_the_loop_took_in_but_never_ran_are_orphaned_not_lost():
    loop = asyncio.new_event_loop()  # never runs: the cluster's loop stopped under its submitters
    inbox = LoopInbox(loop)
    queue = SubmitQueue(inbox, lambda items: pytest.fail("delivered"), limit=None)
    orphans: list[list[str]] = []
    queue.put("a", orphans.append)
    queue.put("b", orphans.append)  # joins the drain asked for "a", which never runs
    inbox.close()
    queue.abandon(orphans.append)
    assert orphans == [["a", "b"]]
    with pytest.raises(ClusterClosedError):
        queue.put("c", orphans.append)  # the inbox is closed: orphaned at once
    assert orphans == [["a", "b"], ["c"]]
    loop.close()


# -------------------------------------------------------------------- through a JobCluster


def test_a_cancel_right_behind_its_submission_always_finds_the_job(node):
    # The cancel and the submission travel through the same inbox: the cancel can never run
    # before the job is known to the loop, from any thread.
    def submit_and_cancel(cluster: clusterpy.JobCluster, out: list[clusterpy.ClusterJob]) -> None:
        for _ in range(25):
            job = cluster.submit(30)
            assert cluster.cancel(job)
            out.append(job)

    with clusterpy.JobCluster(nap, nodes=[node.address]) as cluster:
        jobs: list[clusterpy.ClusterJob] = []
        threads = [threading.Thread(target=submit_and_cancel, args=(cluster, jobs)) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert cluster.wait(30)
        assert len(jobs) == 75 and all(job.status is JobStatus.Cancelled for job in jobs)
        assert cluster.submit(0)(30) == 0  # and the cluster goes on


def test_round_trips_from_several_threads_each_in_order(node):
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def run(t: int, cluster: clusterpy.JobCluster) -> None:
        try:
            results[t] = [cluster.submit(t * 1000 + i)(timeout=30) for i in range(60)]
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    with clusterpy.JobCluster(inc, nodes=[node.address]) as cluster:
        inbox = cluster._inbox
        threads = [threading.Thread(target=run, args=(t, cluster)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert results == {t: [t * 1000 + i + 1 for i in range(60)] for t in range(4)}
    assert inbox.closed and inbox._reader.fileno() == -1  # released with the cluster
    with pytest.raises(ClusterClosedError):
        cluster.submit(1)


def test_submissions_from_the_loop_thread_go_through_the_inbox_too(node):
    chain: list[int] = []
    finished = threading.Event()

    with clusterpy.JobCluster(inc, nodes=[node.address]) as cluster:
        def step(job: clusterpy.ClusterJob) -> None:  # a done callback: runs in the loop thread
            chain.append(job.result)
            if len(chain) < 20:
                cluster.submit(job.result).add_done_callback(step)
            else:
                finished.set()

        cluster.submit(0).add_done_callback(step)
        assert finished.wait(30)
    assert chain == list(range(1, 21))
