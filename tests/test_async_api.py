"""The asyncio-first API: async with, submit_async, await job, async for as_completed, gather,
and cancellation that reaches the node (a cancelled await terminates the running job)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest

import clusterpy
from clusterpy import JobCancelledError, JobStatus, RemoteTraceback

from .conftest import REPO


def nap(seconds, value=None):
    import time

    time.sleep(seconds)
    if value == "fail":
        raise ArithmeticError(f"failed after {seconds}")
    return value if value is not None else seconds


@pytest.fixture(scope="module")
def one_cpu():
    """One worker: a job still running would visibly delay the next one."""
    with clusterpy.JobCluster(nap, local=True, local_cpus=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def two_cpus():
    with clusterpy.JobCluster(nap, local=True, local_cpus=2) as cluster:
        yield cluster


async def test_async_with_submit_async_and_await():
    async with clusterpy.JobCluster(nap, local=True, local_cpus=2) as cluster:
        job = await cluster.submit_async(0.01, "x")
        assert await job == "x" and job.status is JobStatus.Finished
        failing = await cluster.submit_async(0, "fail")
        with pytest.raises(ArithmeticError, match="failed after 0") as info:
            await failing
        assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(clusterpy.ClusterClosedError):
        await cluster.submit_async(0)


async def test_async_for_as_completed_in_completion_order(two_cpus):
    jobs = [two_cpus.submit(0.5, "slow"), two_cpus.submit(0.0, "fast")]
    seen = [job async for job in two_cpus.as_completed(jobs)]
    assert [j.result for j in seen] == ["fast", "slow"]
    assert seen[0] is jobs[1]
    # the same object also iterates synchronously
    jobs = [two_cpus.submit(0.2, 1), two_cpus.submit(0.0, 2)]
    assert sorted(job() for job in two_cpus.as_completed(jobs, timeout=30)) == [1, 2]


async def test_as_completed_timeout(two_cpus):
    job = two_cpus.submit(0.6)
    with pytest.raises(TimeoutError, match="1 .of 1. jobs unfinished"):
        async for _ in two_cpus.as_completed([job], timeout=0.1):
            pass
    assert await job == 0.6


async def test_gather_results_in_order_and_return_exceptions(two_cpus):
    jobs = [two_cpus.submit(d, i) for i, d in enumerate([0.2, 0.0, 0.1])]
    assert await two_cpus.gather(jobs) == [0, 1, 2]
    jobs = [two_cpus.submit(0, "fail"), two_cpus.submit(0, "ok")]
    results = await two_cpus.gather(jobs, return_exceptions=True)
    assert isinstance(results[0], ArithmeticError) and results[1] == "ok"
    with pytest.raises(ArithmeticError):
        await two_cpus.gather([two_cpus.submit(0, "fail"), two_cpus.submit(0.1, "ok")])


async def test_cancelling_the_awaiting_task_cancels_the_job_on_the_node(one_cpu):
    job = one_cpu.submit(30, "never")
    task = asyncio.ensure_future(_await(job))
    await asyncio.sleep(0)  # the task starts awaiting (a task cancelled before it starts never awaited)
    while job.status is not JobStatus.Running:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the job ends Cancelled (terminated on the node), long before its 30 s
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(asyncio.wrap_future(job.future), 10)
    assert job.status is JobStatus.Cancelled
    # and the only worker is free again at once
    start = time.monotonic()
    assert await one_cpu.submit(0, "next") == "next"
    assert time.monotonic() - start < 5


async def _await(job):
    return await job


async def test_wait_for_timeout_cancels_the_job(one_cpu):
    job = one_cpu.submit(30)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(job, 0.5)
    with pytest.raises(JobCancelledError):
        await asyncio.wait_for(asyncio.wrap_future(job.future), 10)
    assert await one_cpu.submit(0, "free") == "free"


async def test_cancelling_gather_cancels_every_pending_job(one_cpu):
    jobs = [one_cpu.submit(30, i) for i in range(3)]  # one runs, two wait in the queue
    task = asyncio.ensure_future(one_cpu.gather(jobs))
    await asyncio.sleep(0)  # the task starts awaiting
    while jobs[0].status is not JobStatus.Running:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    results = await asyncio.wait_for(one_cpu.gather(jobs, return_exceptions=True), 10)
    assert all(isinstance(r, JobCancelledError) for r in results)
    assert all(j.status is JobStatus.Cancelled for j in jobs)


async def test_many_concurrent_awaits(two_cpus):
    async def one(i):
        job = await two_cpus.submit_async(0, i)
        return await job

    assert await asyncio.gather(*(one(i) for i in range(50))) == list(range(50))


def test_async_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "async_api.py")], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "gathered: [0, 1, 4, 9, 16]" in out.stdout
    assert "cancelled on the node: Cancelled" in out.stdout


async def test_pool_terminates_a_job_still_waiting_for_a_worker(tmp_path):
    """The lowest level of the next test: WorkerPool.terminate of a job whose run() waits for
    a worker (the only one is being replaced) stops it before it runs."""
    from clusterpy.pool import WorkerPool

    from .test_pool import function_spec, job as worker_job, sleep_and_pid

    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, sleep_and_pid))
        first, second = worker_job(30), worker_job(30)
        running = asyncio.ensure_future(pool.run(first))
        while first.job_id not in pool._running:
            await asyncio.sleep(0.005)
        assert await pool.terminate(first.job_id)  # the only worker dies and is being replaced
        waiting = asyncio.ensure_future(pool.run(second))
        await asyncio.sleep(0)  # it now waits for the replacement
        assert await pool.terminate(second.job_id)
        outcomes = await asyncio.wait_for(asyncio.gather(running, waiting), 15)
        assert [o.status for o in outcomes] == ["terminated", "terminated"]
        assert outcomes[1].start_time == outcomes[1].end_time  # it never ran
        assert not await pool.terminate("no-such-job")


def test_cancel_reaches_a_started_job_still_waiting_for_its_worker(one_cpu):
    """A node reports a job started before a worker has taken it (e.g. while the worker of a
    terminated job is being replaced): a cancel in that window must still stop it."""
    first, second = one_cpu.submit(30, 1), one_cpu.submit(30, 2)
    deadline = time.monotonic() + 15
    while first.status is not JobStatus.Running and time.monotonic() < deadline:
        time.sleep(0.005)
    first.cancel()  # its worker is killed and replaced; the second job starts waiting for it
    while second.status is not JobStatus.Running and time.monotonic() < deadline:
        time.sleep(0.001)
    second.cancel()
    for job in (first, second):
        with pytest.raises(JobCancelledError):
            job(10)
    assert one_cpu.submit(0, "free")(10) == "free"
