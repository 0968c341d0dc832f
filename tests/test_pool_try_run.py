"""WorkerPool.try_run: the node's task-free way to start a job, with real worker processes.

The node starts every job it can this way and ends it in the callback that reads the
worker's reply, where it also starts the next job; these tests hold it to run()'s
guarantees (terminate, a worker that dies, a killed worker never reused).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from clusterpy.pool import JobOutcome, WorkerPool

from .test_pool import alive, cleanup_marker, eventually, function_spec, job, result

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def add_one(x):
    return x + 1


def work(kind, arg=None):
    if kind == "sleep":
        time.sleep(arg)
        return os.getpid()
    if kind == "die":
        print("last words", flush=True)
        os._exit(arg)
    return os.getpid()


class Outcomes:
    """Collects on_done calls; ``wait(n)`` until n came."""

    def __init__(self) -> None:
        self.got: list[JobOutcome] = []
        self.event = asyncio.Event()

    def __call__(self, outcome: JobOutcome) -> None:
        self.got.append(outcome)
        self.event.set()

    async def wait(self, n: int = 1, timeout: float = 10.0) -> list[JobOutcome]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.event.clear()
                await self.event.wait()
        return self.got


async def test_try_run_starts_only_on_a_worker_that_has_the_computation(tmp_path: Path):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, add_one))
        done = Outcomes()
        assert not pool.try_run(job(1), done), "no worker has loaded the computation yet"
        assert not pool.try_run(job(1, comp_id="unknown"), done)
        assert result(await pool.run(job(1))) == 2  # loads it
        assert pool.try_run(job(41), done)
        assert not pool.try_run(job(1), done), "its only worker is busy"
        (outcome,) = await done.wait(1)
        assert result(outcome) == 42
        assert pool.busy == 0


async def test_on_done_can_start_the_next_job_on_the_worker_just_released(tmp_path: Path):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, add_one))
        await pool.run(job(0))
        done = Outcomes()
        chained: list[bool] = []

        def next_one(outcome: JobOutcome) -> None:
            done(outcome)
            if len(done.got) < 20:
                chained.append(pool.try_run(job(len(done.got)), next_one))

        assert pool.try_run(job(0), next_one)
        outcomes = await done.wait(20)
        assert chained == [True] * 19, "the worker was free for the next job inside on_done"
        assert [result(o) for o in outcomes] == list(range(1, 21))
        assert not pool._tasks, "no task per job"


async def test_terminate_kills_the_worker_of_a_try_run_job_and_it_is_never_reused(tmp_path: Path):
    async with WorkerPool(2) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        first = await asyncio.gather(pool.run(job("pid")), pool.run(job("pid")))
        assert {result(o) for o in first} == set(pool.pids)
        done = Outcomes()
        slow = job("sleep", 30)
        assert pool.try_run(slow, done)
        victim = pool._running[slow.job_id].pid
        assert await pool.terminate(slow.job_id)
        (outcome,) = await done.wait(1)
        assert outcome.status == "terminated" and outcome.exit_code is not None and outcome.exit_code < 0
        await eventually(lambda: not alive(victim))
        pids = [result(await pool.run(job("pid"))) for _ in range(6)]
        assert victim not in pids
        await eventually(lambda: len(pool.pids) == 2 and victim not in pool.pids)


async def test_a_try_run_job_whose_worker_dies_ends_died_with_its_output(tmp_path: Path):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        await pool.run(job("pid"))
        done = Outcomes()
        assert pool.try_run(job("die", 3), done)
        (outcome,) = await done.wait(1, timeout=15.0)
        assert outcome.status == "died" and outcome.exit_code == 3
        assert b"last words" in outcome.stdout
        await eventually(lambda: len(pool.pids) == 1)  # replaced
        assert result(await pool.run(job("pid"))) in pool.pids


async def test_a_try_run_job_running_at_close_still_gets_its_end(tmp_path: Path):
    pool = WorkerPool(1)
    await pool.start()
    pool.add_computation(function_spec(tmp_path, work))
    await pool.run(job("pid"))
    done = Outcomes()
    assert pool.try_run(job("sleep", 30), done)
    await pool.aclose()
    (outcome,) = await done.wait(1)
    assert outcome.status == "terminated"
    assert not pool.try_run(job("pid"), done), "a closed pool starts nothing"


@pytest.mark.parametrize("options_change", [False, True])
async def test_try_run_sends_changed_job_options(tmp_path: Path, options_change: bool):
    async with WorkerPool(1, job_options={"max_file": 1234}) as pool:
        pool.add_computation(function_spec(tmp_path, add_one))
        await pool.run(job(0))
        if options_change:
            pool.job_options["max_file"] = 99
        done = Outcomes()
        assert pool.try_run(job(1), done)
        (outcome,) = await done.wait(1)
        assert result(outcome) == 2
        (worker,) = pool._workers
        assert worker.options == pool.job_options


async def test_a_computation_replaced_while_its_try_run_job_runs_is_cleaned_up_after_it(tmp_path: Path):
    # The pool looks for stale computations in a released worker only when its computations
    # changed (not after every job): a removal and a re-adding under the same id while the
    # job runs must still make the worker run the old one's cleanup, then load the new one.
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, work, cleanup=cleanup_marker))
        pid = result(await pool.run(job("pid")))
        done = Outcomes()
        for n in range(1, 4):  # released after each job, nothing stale: try_run all along
            assert pool.try_run(job("pid"), done)
            await done.wait(n)
        assert pool.try_run(job("sleep", 0.3), done)
        await pool.remove_computation("comp")
        pool.add_computation(function_spec(tmp_path, work, cleanup=cleanup_marker))
        assert [result(o) for o in await done.wait(4)] == [pid] * 4
        # The job's end released the worker into the old computation's cleanup (on_done is
        # called after the release); it is idle again once the cleanup replied.
        assert not pool._idle
        await eventually(lambda: pool._idle)
        assert (tmp_path / "cleaned").read_text().split() == [str(pid)]
        assert not pool.try_run(job("pid"), done), "the new spec is not loaded yet"
        assert result(await pool.run(job("pid"))) == pid  # run() loads it
        assert pool.try_run(job("pid"), done)
        assert result((await done.wait(5))[-1]) == pid
