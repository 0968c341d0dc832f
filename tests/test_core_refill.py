"""A batch of reports refilled once (SchedulerCore.report(..., refill=False) + refill()).

The core driven directly: a batch reported with ``refill=False`` and then refilled decides
exactly as the same reports one by one (fixed prefetch, no stealing), in one dispatch per
node; with adaptive prefetch and work stealing every invariant still holds and every job ends
once. Nothing waiting: the slot is refilled at once, nothing owed. An owed node that is lost
is forgotten. Then a JobCluster against a node played by hand that answers every SubmitJobs
with one JobsDone: the client refills the whole batch with one dispatch.
"""

from __future__ import annotations

import asyncio
import random
import threading

from clusterpy.core.scheduler import (DispatchJobs, JobsRecalled, JobsStarted, NodeJoined, NodeLost, RecallJobs,
                                      SchedulerCore)
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.transport.stream import Connection

from .test_jobs_done_batch import FakeNode, answer, plus_one


def sent(actions: list[object]) -> list[tuple[str, tuple[str, int]]]:
    return [(a.node_id, job) for a in actions if isinstance(a, DispatchJobs) for job in a.jobs]


def drive(core_one: SchedulerCore, core_batch: SchedulerCore, seed: int, steps: int = 400) -> None:
    """Feed both cores one random history (submissions, starts, nodes joining and lost, and
    batches of reports from one node, which ``core_one`` gets one by one and ``core_batch``
    with ``refill=False`` and then ``refill()``), then report every job left; both must
    dispatch the same jobs to the same nodes, in the same order, and end every job once."""
    rng = random.Random(seed)
    cores = (core_one, core_batch)
    inflight: dict[str, list[tuple[str, int]]] = {}
    submitted: list[str] = []
    ended: list[str] = []

    def report_batch(node: str, batch: list[tuple[str, int]]) -> list[list[object]]:
        durations = [rng.choice([None, 0.0005, 0.004, 0.2]) for _ in batch]
        one: list[object] = []
        many: list[object] = []
        for (job, attempt), duration in zip(batch, durations):
            current, actions = core_one.report(node, job, attempt, False, duration)
            assert current
            one += actions
        for (job, attempt), duration in zip(batch, durations):
            current, actions = core_batch.report(node, job, attempt, False, duration, False)
            assert current
            many += actions
            inflight[node].remove((job, attempt))
            ended.append(job)
        core_batch.validate()  # also while a refill is owed
        many += core_batch.refill()
        assert not core_batch.owed
        assert len([a for a in many if isinstance(a, DispatchJobs)]) <= 1  # one dispatch for the batch
        return [one, many]

    for step in range(steps):
        roll = rng.random()
        if len(inflight) < 4 and (roll < 0.03 or not inflight):
            node = f"n{step}"
            inflight[node] = []
            joined = NodeJoined(node, rng.randint(1, 3))
            outcomes = [core.handle(joined) for core in cores]
        elif roll < 0.6:  # more jobs come than end: a queue builds up, and refills are owed
            job = f"j{step}"
            submitted.append(job)
            outcomes = [core.submit(job) for core in cores]
        elif roll < 0.65:
            node = rng.choice(sorted(inflight))
            started = JobsStarted(node, tuple(inflight[node][:2]))
            outcomes = [core.handle(started) for core in cores]
        elif roll < 0.66 and len(inflight) > 1:
            node = rng.choice(sorted(inflight))
            outcomes = [core.handle(NodeLost(node, "test")) for core in cores]
            assert outcomes[0] == outcomes[1]
            ended.extend(a.job_id for a in outcomes[0] if not isinstance(a, DispatchJobs))  # abandoned
            del inflight[node]
        else:
            node = rng.choice(sorted(inflight))
            batch = inflight[node][: rng.randint(1, 4)]
            if not batch:
                continue
            outcomes = report_batch(node, batch)
        record(outcomes, inflight, step)
    while any(inflight.values()):  # then report every job left, in batches
        node = next(n for n, jobs in inflight.items() if jobs)
        record(report_batch(node, inflight[node][:3]), inflight, "drain")
    for core in cores:
        core.validate()
        assert core.pending() == 0
    assert sorted(ended) == sorted(submitted)  # each job ended once


def record(outcomes: list[list[object]], inflight: dict[str, list[tuple[str, int]]], step: object) -> None:
    dispatched = sent(outcomes[0])
    assert sent(outcomes[1]) == dispatched, step  # the same jobs, attempts and nodes, in order
    for node, job in dispatched:
        inflight[node].append(job)


def test_a_batch_refilled_once_decides_as_its_reports_one_by_one():
    for seed in range(6):
        for prefetch in (0, 1, 3):
            drive(SchedulerCore(prefetch=prefetch, steal=False), SchedulerCore(prefetch=prefetch, steal=False), seed)


def test_with_adaptive_prefetch_and_stealing_every_job_still_ends_once():
    for seed in range(6):
        rng = random.Random(seed)
        core = SchedulerCore(prefetch=None, steal=True)
        inflight: dict[str, list[tuple[str, int]]] = {"a": [], "b": [], "c": []}
        ended: list[str] = []

        def take(actions: list[object]) -> None:
            for action in actions:
                if isinstance(action, DispatchJobs):
                    inflight[action.node_id].extend(action.jobs)
                elif isinstance(action, RecallJobs):  # none was started here: all given back
                    for job in action.jobs:
                        inflight[action.node_id].remove(job)
                    take(core.handle(JobsRecalled(action.node_id, action.jobs)))

        for node, cpus in (("a", 2), ("b", 1), ("c", 3)):
            take(core.handle(NodeJoined(node, cpus)))
        for i in range(300):
            take(core.submit(f"j{i}"))
            if rng.random() < 0.3 or i == 299:
                while any(inflight.values()) and (rng.random() < 0.5 or i == 299):
                    node = rng.choice([n for n, jobs in inflight.items() if jobs])
                    for job, attempt in inflight[node][: rng.randint(1, 5)]:
                        current, actions = core.report(node, job, attempt, False, rng.choice([0.0005, 0.01]), False)
                        assert current and not [a for a in actions if isinstance(a, DispatchJobs)]
                        inflight[node].remove((job, attempt))
                        ended.append(job)
                        take(actions)
                    core.validate()
                    take(core.refill())
                    core.validate()
        assert core.pending() == 0 and sorted(ended) == sorted(f"j{i}" for i in range(300))


def test_nothing_waiting_refills_at_once_and_owes_nothing():
    core = SchedulerCore(prefetch=0, steal=False)
    core.handle(NodeJoined("a", 1))
    [(node, (job, attempt))] = sent(core.submit("j1"))
    assert core.report(node, job, attempt, False, None, False) == (True, [])
    assert not core.owed
    assert sent(core.submit("j2")) == [("a", ("j2", 1))]  # the slot was given back at once
    core.validate()


def test_an_owed_node_that_is_lost_is_forgotten():
    core = SchedulerCore(prefetch=0, steal=False, reentrant=True)
    core.handle(NodeJoined("a", 1))
    core.handle(NodeJoined("b", 1))
    first = sent(core.submit("j1")) + sent(core.submit("j2"))
    core.submit("j3")  # waits
    node, (job, attempt) = next(s for s in first if s[0] == "a")
    assert core.report(node, job, attempt, False, None, False) == (True, [])
    assert core.owed == {"a": None}
    core.validate()
    actions = core.handle(NodeLost("a", "test"))
    assert not core.owed and sent(actions) == []  # j3 still waits: b is busy
    assert core.refill() == []
    core.validate()


# -------------------------------------------------------------------- through a JobCluster


async def test_a_jobs_done_of_several_reports_is_refilled_with_one_dispatch():
    """The node played by hand answers each SubmitJobs with one JobsDone of all its jobs: the
    client's refill for those reports is one dispatch of as many jobs, not one per report."""
    import clusterpy

    async def on_jobs(node: FakeNode, conn: Connection, msg: m.SubmitJobs) -> None:
        conn.send(codec.encode(m.JobsDone(msg.comp_id, tuple(answer(msg.comp_id, req, plus_one(req))
                                                              for req in msg.jobs))))

    def client(address: str) -> tuple[list[int], list[int], list[int]]:
        with clusterpy.JobCluster(inc, nodes=[address], prefetch=1) as cluster:
            rt = cluster._rt
            dispatches: list[int] = []
            lock = threading.Lock()
            real = rt._dispatch

            def counting(node_id: str, jobs: tuple[tuple[str, int], ...]) -> None:
                with lock:
                    dispatches.append(len(jobs))
                real(node_id, jobs)

            rt._dispatch = counting
            jobs = [cluster.submit(i) for i in range(40)]
            results = [job(30) for job in jobs]
            return results, dispatches, [len(req) for req in [node.requests]]

    node = await FakeNode(on_jobs).start()
    try:
        async with asyncio.timeout(60):
            results, dispatches, _ = await asyncio.to_thread(client, node.address)
    finally:
        await node.aclose()
    assert results == [i + 1 for i in range(40)]
    assert sum(dispatches) == 40 and len(node.requests) == 40
    # 2 CPUs, one ahead each: batches of up to 4 reports, each refilled by one dispatch.
    assert max(dispatches) >= 2 and len(dispatches) < 40, dispatches


def inc(x):
    return x + 1
