"""WorkerPool.try_queue: a job written to a busy worker, to start the moment the short job
before it ends, with real worker processes; and the node using it (RunQueue._queue_behind).

The pool queues a job behind another only when that one is surely short (QUICK_JOB, after
QUICK_STREAK short jobs of its computation); tests that need a job to wait behind a long one
lift those limits. What they hold the pool to: the queued job starts only after the one
before it and runs exactly once, or never (skipped when terminated before its turn, given
back when its worker exits first), and every job still ends exactly once.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from clusterpy import pool as pool_module
from clusterpy._channel import encode_frame
from clusterpy.pool import JobOutcome, WorkerPool

from .test_node_run_queue import node  # noqa: F401  (a fixture: an in-process node, 2 CPUs)
from .test_pool import function_spec, job, result
from .test_pool_try_run import Outcomes

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def work(kind, arg=None, marker=None):
    """``("sleep", s)``: sleep; ``("pid",)``: just the pid. ``marker``: a file it creates
    when it runs, so a test can tell whether it ran."""
    if marker is not None:
        Path(marker).touch()
    if kind == "sleep":
        time.sleep(arg)
    return (os.getpid(), time.time())


class Calls:
    """Counts the try_queue callbacks of one job."""

    def __init__(self) -> None:
        self.started = 0
        self.given_back = 0

    def start(self) -> None:
        self.started += 1

    def give_back(self) -> None:
        self.given_back += 1


@pytest.fixture
def slow_machine(monkeypatch):
    """The real rules with a longer QUICK_JOB: a trivial job on a loaded test machine can be
    preempted past 2 ms, which would end a streak the test counts on."""
    monkeypatch.setattr(pool_module, "QUICK_JOB", 0.1)


@pytest.fixture
def no_limits(monkeypatch):
    """Queue behind any job, however long it runs, from the first job on."""
    monkeypatch.setattr(pool_module, "QUICK_JOB", 60.0)
    monkeypatch.setattr(pool_module, "QUICK_STREAK", 0)


async def _warm(pool: WorkerPool, n: int) -> None:
    for _ in range(n):
        result(await pool.run(job("pid")))


@pytest.fixture
async def one_worker(tmp_path: Path, no_limits):
    """A pool of one worker that has run a job of ``work``, and an on_done collector."""
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        await _warm(pool, 1)
        yield pool, Outcomes(), Calls()


async def test_a_queued_job_starts_on_the_same_worker_once_the_one_before_it_ends(tmp_path: Path, no_limits):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        await _warm(pool, 1)
        done, calls = Outcomes(), Calls()
        assert not pool.try_queue(job("pid"), done, calls.start, calls.give_back), "nothing runs: nothing to queue behind"
        assert pool.try_run(job("sleep", 0.3), done)
        assert pool.try_queue(job("pid"), done, calls.start, calls.give_back)
        assert (pool.busy, pool.queued) == (1, 1)
        assert not pool.try_queue(job("pid"), done, Calls().start, Calls().give_back), "one job behind another at most"
        first, second = await done.wait(2)
        (pid1, _), (pid2, ran_at) = result(first), result(second)
        assert pid1 == pid2
        assert ran_at >= first.end_time and second.start_time >= first.end_time
        assert (calls.started, calls.given_back) == (1, 0)
        assert (pool.busy, pool.queued) == (0, 0)


async def test_only_behind_short_jobs_of_the_same_computation(tmp_path: Path, slow_machine):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        pool.add_computation(function_spec(tmp_path, work, comp_id="other"))
        done = Outcomes()
        result(await pool.run(job("pid", comp_id="other")))
        for _ in range(pool_module.QUICK_STREAK - 1):
            result(await pool.run(job("pid")))
        assert pool.try_run(job("pid"), done)
        assert not pool.try_queue(job("pid"), done, Calls().start, Calls().give_back), "not enough short jobs seen yet"
        await done.wait(1)
        # Behind a job of another computation: no.
        assert pool.try_run(job("sleep", 0.05, comp_id="other"), done)
        assert not pool.can_queue("other")
        assert not pool.try_queue(job("pid"), done, Calls().start, Calls().give_back)
        await done.wait(2)
        # Behind a short job of its own: yes.
        assert pool.try_run(job("pid"), done)
        assert pool.can_queue("comp")
        assert pool.try_queue(job("pid"), done, Calls().start, Calls().give_back)
        await done.wait(4)
        # Behind a job that has run for longer than QUICK_JOB already: no.
        assert pool.try_run(job("sleep", 0.4), done)
        await asyncio.sleep(pool_module.QUICK_JOB * 2)
        assert not pool.try_queue(job("pid"), done, Calls().start, Calls().give_back)
        await done.wait(5)
        # That long job ended the streak: nothing waits behind this computation's jobs now.
        assert pool.try_run(job("pid"), done)
        assert not pool.can_queue("comp")
        assert not pool.try_queue(job("pid"), done, Calls().start, Calls().give_back)
        await done.wait(6)
        assert [o.status for o in done.got] == ["finished"] * 6


async def test_a_stream_of_short_jobs_runs_each_job_once(tmp_path: Path, slow_machine):
    """With the real rules: after a few short jobs, most of a stream waits behind another."""
    async with WorkerPool(2) as pool:
        pool.add_computation(function_spec(tmp_path, work))
        await _warm(pool, pool_module.QUICK_STREAK + 1)
        done = Outcomes()
        waiting = [job("pid") for _ in range(300)]
        queued_behind = 0

        def feed() -> None:
            nonlocal queued_behind
            while waiting and pool.try_run(waiting[0], on_done):
                waiting.pop(0)
            while waiting and pool.try_queue(waiting[0], on_done, lambda: None, lambda: None):
                waiting.pop(0)
                queued_behind += 1

        def on_done(outcome: JobOutcome) -> None:
            done(outcome)
            feed()

        feed()
        got = await done.wait(300, timeout=30)
        assert len({o.job_id for o in got}) == 300 and all(o.status == "finished" for o in got)
        assert queued_behind > 100, queued_behind
        assert (pool.busy, pool.queued) == (0, 0)


async def test_terminate_skips_a_job_waiting_behind_another(tmp_path: Path, one_worker):
    pool, done, calls = one_worker
    marker = tmp_path / "ran"
    assert pool.try_run(job("sleep", 0.3), done)
    behind = job("pid", marker=str(marker))
    assert pool.try_queue(behind, done, calls.start, calls.give_back)
    assert await pool.terminate(behind.job_id)
    first, second = await done.wait(2)
    assert result(first) and first.status == "finished"
    assert (second.job_id, second.status) == (behind.job_id, "cancelled")
    assert not marker.exists(), "a skipped job must not run"
    assert (pool.busy, pool.queued) == (0, 0)
    # The worker goes on serving.
    assert result(await pool.run(job("pid")))


async def test_a_job_whose_worker_dies_before_its_turn_is_given_back(tmp_path: Path, one_worker):
    pool, done, calls = one_worker
    marker = tmp_path / "ran"
    assert pool.try_run(job("sleep", 30), done)
    (pid,) = pool.pids
    behind = job("pid", marker=str(marker))
    assert pool.try_queue(behind, done, calls.start, calls.give_back)
    os.kill(pid, signal.SIGKILL)
    (first,) = await done.wait(1)
    assert first.status == "died"
    assert (calls.started, calls.given_back) == (0, 1)
    assert pool.queued == 0 and not marker.exists()
    await asyncio.sleep(0.2)
    assert len(done.got) == 1, "a job given back does not end here"


async def test_a_worker_giving_a_job_back_takes_no_other(one_worker):
    """What the give-back starts (the node queues the job again at once) must not write a
    job behind the worker that is exiting: nothing would ever give that one back."""
    pool, done, calls = one_worker
    assert pool.try_run(job("sleep", 30), done)
    (pid,) = pool.pids
    taken: list[bool] = []
    assert pool.try_queue(job("pid"), done, calls.start,
                          lambda: taken.append(pool.try_queue(job("pid"), done, calls.start, calls.give_back)))
    os.kill(pid, signal.SIGKILL)
    (first,) = await done.wait(1)
    assert first.status == "died"
    assert taken == [False]
    assert pool.queued == 0


async def test_terminating_the_job_before_kills_it_and_gives_the_queued_one_back(one_worker):
    pool, done, calls = one_worker
    head = job("sleep", 30)
    assert pool.try_run(head, done)
    assert pool.try_queue(job("pid"), done, calls.start, calls.give_back)
    assert await pool.terminate(head.job_id)
    (first,) = await done.wait(1)
    assert (first.job_id, first.status) == (head.job_id, "terminated")
    assert (calls.started, calls.given_back) == (0, 1)


async def test_a_forged_skipped_reply_kills_the_worker(one_worker):
    """A worker may say "skipped" only for the job the pool asked it to skip."""
    pool, done, _ = one_worker
    (pid,) = pool.pids
    worker = next(iter(pool._workers))
    assert pool.try_run(job("sleep", 0.2), done)
    worker.on_data(b"".join(encode_frame(("skipped", worker.job_id))))
    (outcome,) = await done.wait(1)
    assert outcome.status == "died"
    assert pid not in pool.pids


# ------------------------------------------------------------------------------ the node


SCRIPT = b'#!/bin/sh\nsleep "$1"\nif [ -n "$2" ]; then touch "$2"; fi\n'


def _request(job_id: str, *args: str):
    from clusterpy.protocol import messages as m

    return m.JobRequest(job_id, 0, pickle.dumps((args, {}), protocol=5), None, 1)


async def _ends(conn, n: int) -> dict[str, object]:
    """The next ``n`` job reports, by job id (JobsStarted skipped; batched reports opened)."""
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m

    ended: dict[str, object] = {}
    async with asyncio.timeout(20):
        while len(ended) < n:
            message = codec.decode(await conn.recv())
            if isinstance(message, m.JobsStarted):
                continue
            for report in getattr(message, "reports", (message,)):
                assert isinstance(report, m.JobDone), report
                ended[report.job_id] = report
    return ended


async def _warm_node(conn) -> None:
    """Both workers load the computation (a job queues only behind one started without a load)."""
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m

    from .test_node_run_queue import COMP

    conn.send(codec.encode(m.SubmitJobs(COMP, (_request("warm-1", "0.2"), _request("warm-2", "0.2")))))
    assert {r.status for r in (await _ends(conn, 2)).values()} == {"finished"}  # type: ignore[attr-defined]


@pytest.mark.usefixtures("no_limits")
async def test_the_node_queues_jobs_behind_busy_workers_and_can_cancel_them(node, tmp_path):
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m

    from . import test_node_run_queue as run_queue

    conn = await run_queue.deploy(node, SCRIPT)
    cancelled, kept = tmp_path / "cancelled", tmp_path / "kept"
    async with conn:
        await _warm_node(conn)
        conn.send(codec.encode(m.SubmitJobs(run_queue.COMP, (
            _request("a", "1"), _request("b", "1"), _request("c", "0", str(kept)), _request("d", "0", str(cancelled))))))
        async with asyncio.timeout(10):
            while node.pool.queued < 2:
                await asyncio.sleep(0.01)
        status = node.status_reply()
        assert (status.busy_cpus, status.queued) == (2, 2)
        conn.send(codec.encode(m.CancelJob(run_queue.COMP, "d", 0)))
        ended = await _ends(conn, 4)
        assert {k: v.status for k, v in ended.items()} == {  # type: ignore[attr-defined]
            "a": "finished", "b": "finished", "c": "finished", "d": "cancelled"}
        assert kept.exists() and not cancelled.exists()
        assert ended["c"].start_time >= min(ended["a"].end_time, ended["b"].end_time)  # type: ignore[attr-defined]
        status = node.status_reply()
        assert (status.busy, status.busy_cpus, status.queued) == (0, 0, 0)


@pytest.mark.usefixtures("no_limits")
async def test_a_job_given_back_by_a_dying_worker_runs_on_another(node):
    from clusterpy.protocol import codec
    from clusterpy.protocol import messages as m

    from . import test_node_run_queue as run_queue

    conn = await run_queue.deploy(node)
    async with conn:
        await _warm_node(conn)
        conn.send(codec.encode(m.SubmitJobs(run_queue.COMP, (
            _request("a", "30"), _request("b", "0.5"), _request("c", "0"), _request("d", "0")))))
        async with asyncio.timeout(10):
            while node.pool.queued < 2:
                await asyncio.sleep(0.01)
        # Kill the worker running a (and holding c or d behind it): a dies; the job behind it
        # runs elsewhere and finishes.
        worker = node.pool._running[next(k for k in node.pool._running if k.split("/")[1] == "a")]
        os.killpg(worker.pid, signal.SIGKILL)
        ended = await _ends(conn, 4)
        assert {k: v.status for k, v in ended.items()} == {  # type: ignore[attr-defined]
            "a": "died", "b": "finished", "c": "finished", "d": "finished"}
