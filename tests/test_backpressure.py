"""Submission backpressure (``max_queued``, ``submit_timeout``) and the client's lazy job waits.

Three tiers: the SubmitQueue and ClusterJob's waits driven directly by threads (no sockets);
a JobCluster whose only node address refuses connections, so that no job is ever dispatched
and the queue fills deterministically; and real ``clusterpy-node`` processes (and a
``clusterpy-scheduler``) where jobs wait on a gate file, so that a blocked submitter can be
seen to resume as the node takes jobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import subprocess
import sys
import threading
import time
import tracemalloc

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy._submit import LoopInbox, SubmitQueue
from clusterpy.errors import ClusterClosedError, ConfigurationError, QueueFullError
from clusterpy.job import ClusterJob, JobSync

from .conftest import REPO, wait_until

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: every job stays queued


def inc(x):
    return x + 1


def gated(x, gate):
    """Wait until the file ``gate`` exists (the test opens it), then return x + 1."""
    import os
    import time

    while not os.path.exists(gate):
        time.sleep(0.01)
    return x + 1


class Submitter(threading.Thread):
    """Submits ``count`` jobs in a thread, recording how far it got and how it ended."""

    def __init__(self, submit, count):
        super().__init__(daemon=True)
        self.submit, self.count = submit, count
        self.jobs: list = []
        self.error: BaseException | None = None

    def run(self):
        try:
            for i in range(self.count):
                self.jobs.append(self.submit(i))
        except BaseException as exc:  # noqa: BLE001 -- the test inspects it
            self.error = exc


def blocked(thread: Submitter, settle: float = 0.3) -> bool:
    """True if ``thread`` is alive and submitted nothing more for ``settle`` seconds."""
    before = len(thread.jobs)
    time.sleep(settle)
    return thread.is_alive() and len(thread.jobs) == before


# -------------------------------------------------------------------- SubmitQueue alone


@pytest.fixture
def inbox():
    loop = asyncio.new_event_loop()
    inbox = LoopInbox(loop)
    yield inbox
    inbox.close()
    loop.close()


def test_queue_admits_up_to_the_bound_then_times_out(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=3)
    for _ in range(3):
        queue.admit(0)
    assert queue.queued == 3 and not queue.try_admit()
    start = time.monotonic()
    with pytest.raises(QueueFullError, match=r"max_queued=3.*waited 0.2 s"):
        queue.admit(0.2)
    assert 0.15 <= time.monotonic() - start < 2
    with pytest.raises(QueueFullError, match="did not wait"):
        queue.admit(0)
    assert queue.queued == 3 and queue.submitted == 3


def test_queue_blocked_submitter_resumes_at_the_low_water_mark(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=20)  # resumes at 18 (a tenth below)
    for _ in range(20):
        queue.admit()
    admitted = threading.Event()
    thread = threading.Thread(target=lambda: (queue.admit(), admitted.set()), daemon=True)
    thread.start()
    assert not admitted.wait(0.2)
    queue.release(1)  # 19 left: above the low-water mark, no wake-up
    assert not admitted.wait(0.2)
    queue.release(1)  # 18: wake
    assert admitted.wait(5)
    thread.join(5)
    assert queue.queued == 19


def test_queue_close_wakes_blocked_threads_and_coroutines(inbox):
    queue = SubmitQueue(inbox, lambda items: None, limit=1)
    queue.admit()
    errors: list[BaseException] = []

    def wait_sync():
        try:
            queue.admit()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    async def wait_async():
        try:
            await queue.admit_async()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=wait_sync), threading.Thread(target=lambda: asyncio.run(wait_async()))]
    for t in threads:
        t.start()
    wait_until(lambda: queue._sleepers == 1 and len(queue._async_waiters) == 1, 5)
    queue.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert len(errors) == 2 and all(isinstance(e, ClusterClosedError) for e in errors)
    with pytest.raises(ClusterClosedError):
        queue.try_admit()


async def test_queue_async_admission_waits_without_blocking_its_loop():
    inbox = LoopInbox(asyncio.get_running_loop())
    queue = SubmitQueue(inbox, lambda items: None, limit=2)
    await queue.admit_async()
    await queue.admit_async()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    tick = asyncio.ensure_future(ticker())
    waiter = asyncio.ensure_future(queue.admit_async())
    await asyncio.sleep(0.2)
    assert not waiter.done() and ticks >= 5  # the loop ran on while the submission waited
    threading.Thread(target=queue.release, args=(1,)).start()  # released from another thread, like the cluster loop
    await asyncio.wait_for(waiter, 5)
    assert queue.queued == 2
    with pytest.raises(QueueFullError):
        await queue.admit_async(0.05)
    cancelled = asyncio.ensure_future(queue.admit_async())
    await asyncio.sleep(0.05)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert queue.queued == 2 and not queue._async_waiters  # cancelling admitted nothing
    tick.cancel()
    inbox.close()


def test_queue_hands_items_to_the_loop_in_batches(inbox):
    batches: list[list[int]] = []
    queue = SubmitQueue(inbox, batches.append, limit=None)
    loop = inbox._loop
    for i in range(5):
        queue.put(i, on_orphaned=lambda items: None)  # the loop is not running: all in one batch
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert batches == [[0, 1, 2, 3, 4]]


def test_queue_put_on_a_closed_loop_orphans_the_items():
    loop = asyncio.new_event_loop()
    loop.close()
    orphans: list[list[str]] = []
    queue = SubmitQueue(LoopInbox(loop), lambda items: None, limit=None)
    with pytest.raises(ClusterClosedError):
        queue.put("a", on_orphaned=orphans.append)
    assert orphans == [["a"]]


# -------------------------------------------------------------------- ClusterJob's waits


def test_job_waits_without_a_future_and_wakes_when_it_ends():
    class Owner:
        _sync = JobSync()

    job = ClusterJob(Owner(), (1,), {}, time.time())
    assert job._fut is None and not job.done()
    with pytest.raises(TimeoutError):
        job(0.05)
    threading.Timer(0.1, job._end, (JobStatus.Finished, 42)).start()
    assert job(5) == 42 and job.done() and job._fut is None  # no Future was needed
    assert job.future.result(0) == 42  # one made afterwards is resolved at once

    failed = ClusterJob(Owner(), (), {}, time.time())
    future = failed.future  # made before the end: the end resolves it
    failed._set_running()
    assert future.running()
    failed._end(JobStatus.Terminated, exc=ZeroDivisionError("x"))
    with pytest.raises(ZeroDivisionError):
        failed()
    assert isinstance(future.exception(0), ZeroDivisionError)


def test_many_threads_wait_for_many_jobs():
    class Owner:
        _sync = JobSync()

    jobs = [ClusterJob(Owner(), (i,), {}, time.time()) for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = [pool.submit(job, 10) for job in jobs]
        for i, job in enumerate(reversed(jobs)):
            job._end(JobStatus.Finished, 199 - i)
        assert [r.result(10) for r in results] == list(range(200))


def test_waits_that_time_out_while_jobs_end_stay_consistent():
    """Timeouts racing with ends: every parked thread is released once, none is left behind."""
    import random

    class Owner:
        _sync = JobSync()

    jobs = [ClusterJob(Owner(), (i,), {}, time.time()) for i in range(300)]
    timeouts = [0]

    def collect(seed):
        rng = random.Random(seed)
        out = []
        for job in jobs:
            while True:
                try:
                    out.append(job(rng.choice((0.0001, 0.0005, 0.002))))
                    break
                except TimeoutError:
                    timeouts[0] += 1
        return out

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = [pool.submit(collect, seed) for seed in range(6)]
        for i, job in enumerate(jobs):
            if i % 7 == 0:
                time.sleep(0.002)
            job._end(JobStatus.Finished, i)
        assert all(r.result(30) == list(range(300)) for r in results)
    assert timeouts[0] > 0 and not Owner._sync.waiting


# -------------------------------------------------------------------- a cluster whose node never answers


@pytest.fixture
def stuck():
    """A cluster that can never dispatch: every submitted job stays queued."""
    cluster = clusterpy.JobCluster(inc, nodes=[UNREACHABLE], connect_timeout=1.0, max_queued=5)
    yield cluster
    cluster.close(terminate=True, timeout=30)


def test_options_are_checked():
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ConfigurationError, match="max_queued"):
            clusterpy.JobCluster(inc, nodes=[UNREACHABLE], max_queued=bad)
    with pytest.raises(ConfigurationError, match="submit_timeout"):
        clusterpy.JobCluster(inc, nodes=[UNREACHABLE], submit_timeout=-1)


def test_submit_times_out_at_the_bound(stuck):
    jobs = [stuck.submit(i) for i in range(5)]
    assert stuck.queued == 5
    with pytest.raises(QueueFullError, match="max_queued=5"):
        stuck.submit_job((5,), submit_timeout=0)
    start = time.monotonic()
    with pytest.raises(QueueFullError):
        stuck.submit_job((5,), submit_timeout=0.3)
    assert time.monotonic() - start >= 0.25
    assert stuck.queued == 5 and stuck.stats().jobs_submitted == 5  # the refused jobs were never submitted
    stuck.cancel(jobs[0])  # a cancelled queued job makes room
    wait_until(lambda: stuck.queued == 4, 5)
    assert jobs[0].status is JobStatus.Cancelled
    stuck.submit_job((6,), submit_timeout=0)


def test_unpicklable_arguments_give_the_room_back(stuck):
    for _ in range(10):
        with pytest.raises(clusterpy.ClusterError, match="cannot be pickled"):
            stuck.submit(threading.Lock())
    assert stuck.queued == 0 and stuck.stats().jobs_submitted == 0


def test_cluster_submit_timeout_option():
    with clusterpy.JobCluster(inc, nodes=[UNREACHABLE], connect_timeout=1.0, max_queued=2,
                              submit_timeout=0.1) as cluster:
        cluster.submit(1), cluster.submit(2)
        with pytest.raises(QueueFullError):
            cluster.submit(3)
        cluster.stop()  # drop the queued jobs, so that close() does not wait for them


def test_close_wakes_blocked_submitters(stuck):
    thread = Submitter(stuck.submit, 100)
    thread.start()
    wait_until(lambda: len(thread.jobs) == 5, 10)
    assert blocked(thread)
    closer = threading.Thread(target=stuck.close, kwargs=dict(terminate=True, timeout=30))
    closer.start()
    thread.join(10)
    closer.join(30)
    assert not thread.is_alive() and isinstance(thread.error, ClusterClosedError)
    assert len(thread.jobs) == 5 and all(j.status is JobStatus.Cancelled for j in thread.jobs)


def test_a_submission_from_the_loop_thread_is_never_blocked(stuck):
    """A done callback runs in the cluster's loop thread: blocking it there would deadlock."""
    first = stuck.submit(0)
    for i in range(4):
        stuck.submit(i)
    assert stuck.queued == 5
    follow_ups: list = []
    first.add_done_callback(lambda job: follow_ups.append(stuck.submit(100)))
    stuck.cancel(first)  # ends it: its callback submits, past the bound
    wait_until(lambda: follow_ups, 5)
    wait_until(lambda: stuck.queued == 5, 5)  # first left the queue, its follow-up entered it


async def test_submit_async_awaits_room_without_blocking_the_loop(stuck):
    for i in range(5):
        await stuck.submit_async(i)
    pending = asyncio.ensure_future(stuck.submit_async(5))
    await asyncio.sleep(0.3)
    assert not pending.done()  # and this coroutine ran meanwhile: the loop was not blocked
    stuck.stop()  # drops the queued jobs: room
    job = await asyncio.wait_for(pending, 10)
    assert job.args == (5,)
    cancelled = [asyncio.ensure_future(stuck.submit_async(i)) for i in range(10)]
    await asyncio.sleep(0.3)
    for task in cancelled:
        task.cancel()
    done = await asyncio.gather(*cancelled, return_exceptions=True)
    submitted = [j for j in done if isinstance(j, ClusterJob)]
    assert len(submitted) <= 5 and stuck.queued == len(submitted) + 1


def test_executor_submit_blocks_and_shutdown_is_not_held_up():
    executor = clusterpy.ClusterExecutor([UNREACHABLE], connect_timeout=1.0, max_queued=3)
    thread = Submitter(lambda i: executor.submit(inc, i), 50)
    thread.start()
    wait_until(lambda: len(thread.jobs) == 3, 10)
    assert blocked(thread)
    start = time.monotonic()
    executor.shutdown(wait=True, cancel_futures=True)  # cancels the queued calls; closes the cluster
    assert time.monotonic() - start < 20
    thread.join(10)
    assert isinstance(thread.error, (RuntimeError, ClusterClosedError))
    assert all(f.cancelled() for f in thread.jobs)


def test_memory_per_queued_job_is_bounded():
    """bench/simcore.py's measurement, smaller: the client holds about 1 KB per queued job
    (2.7 KB before jobs made their Future lazily), and at most max_queued of them."""
    jobs = 2_000
    with clusterpy.JobCluster(inc, nodes=[UNREACHABLE], connect_timeout=1.0, max_queued=jobs) as cluster:
        held = []
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(jobs):
                held.append(cluster.submit(i))
            cluster.nodes()  # a barrier: runs in the loop thread after every submission
            per_job = (tracemalloc.get_traced_memory()[0] - before) / jobs
        finally:
            tracemalloc.stop()
        with pytest.raises(QueueFullError):
            cluster.submit_job((0,), submit_timeout=0)
        cluster.stop()
    assert per_job < 1_600, f"{per_job:.0f} bytes per queued job"


# -------------------------------------------------------------------- real nodes


def test_blocked_submit_resumes_as_jobs_are_dispatched(node, tmp_path):
    gate = tmp_path / "gate"
    with clusterpy.JobCluster(gated, nodes=[node.address], max_queued=4) as cluster:
        thread = Submitter(lambda i: cluster.submit(i, str(gate)), 40)
        thread.start()
        # The node holds 2 CPUs x (1 + prefetch 1) = 4 jobs; the client 4 more; then submit blocks.
        wait_until(lambda: len(thread.jobs) >= 8 and cluster.queued == 4, 20)
        assert blocked(thread) and len(thread.jobs) == 8
        gate.touch()
        thread.join(60)
        assert not thread.is_alive() and thread.error is None
        assert [j(30) for j in thread.jobs] == [i + 1 for i in range(40)]
        assert cluster.queued == 0


def test_job_callback_that_submits_does_not_deadlock(node, tmp_path):
    """The cluster's callback thread submits follow-ups while the main thread is blocked at the
    bound; executor done callbacks (the loop thread) submit too."""
    gate = tmp_path / "gate"
    follow_ups: list = []
    lock = threading.Lock()

    def callback(job):
        if isinstance(job.args[0], int) and job.args[0] < 1000:  # one follow-up per first-generation job
            with lock:
                follow_ups.append(cluster.submit(job.args[0] + 1000, str(gate)))

    cluster = clusterpy.JobCluster(gated, nodes=[node.address], max_queued=2, callback=callback)
    try:
        executor = cluster.executor()
        chained: list = []
        first = executor.submit(gated, -1, str(gate))
        first.add_done_callback(lambda f: chained.append(executor.submit(inc, 1)))  # runs in the loop thread
        main = Submitter(lambda i: cluster.submit(i, str(gate)), 20)
        main.start()
        wait_until(lambda: len(main.jobs) >= 5, 20)
        assert blocked(main)
        gate.touch()
        main.join(60)
        assert main.error is None and [j(30) for j in main.jobs] == [i + 1 for i in range(20)]
        assert first.result(30) == 0
        wait_until(lambda: chained and len(follow_ups) == 20, 30)
        assert chained[0].result(30) == 2
        assert sorted(j(30) for j in follow_ups) == [i + 1001 for i in range(20)]
    finally:
        cluster.close(timeout=60)


def test_map_and_executor_map_under_a_small_bound(node):
    """A map's window larger than max_queued: its submissions block at the bound and resume."""
    with clusterpy.JobCluster(inc, nodes=[node.address], max_queued=2) as cluster:
        assert list(cluster.map(range(200), buffersize=50)) == [i + 1 for i in range(200)]
        executor = cluster.executor()
        assert list(executor.map(inc, range(100), buffersize=40)) == [i + 1 for i in range(100)]
        assert list(executor.map(inc, range(300), chunksize=7, buffersize=40)) == [i + 1 for i in range(300)]
        assert cluster.queued == 0


def test_shared_cluster_goes_through_the_same_queue(tmp_path):
    """SharedJobCluster: a scheduler with no reachable node takes its window (1,024 jobs) and
    holds them; the client then queues max_queued more and blocks."""
    sched = subprocess.Popen([sys.executable, "-m", "clusterpy.scheduler", "--port", "0", "--log-level", "WARNING",
                              "-n", UNREACHABLE], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        line = sched.stdout.readline().decode()
        address = line.split("listening on ")[1].split()[0]
        cluster = clusterpy.SharedJobCluster(inc, address, max_queued=10)
        try:
            wait_until(lambda: cluster.nodes(), 20)
            jobs = [cluster.submit_job((i,), submit_timeout=5) for i in range(1024 + 10)]
            wait_until(lambda: cluster.queued == 10, 10)
            with pytest.raises(QueueFullError):
                cluster.submit_job((0,), submit_timeout=0.2)
            assert len(jobs) == 1034
        finally:
            cluster.close(terminate=True, timeout=30)
    finally:
        sched.terminate()
        sched.wait(15)


def test_backpressure_example():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "backpressure.py"), "--jobs", "3000"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "3000 results, all correct" in out.stdout
    assert "never more than 200 jobs queued" in out.stdout
    assert "QueueFullError" in out.stdout
