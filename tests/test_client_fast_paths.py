"""The per-job fast paths of the client (issue 7) keep the generic paths' behaviour.

* The scheduling core's entries for the two events of every job (``submit``, ``report``) decide
  exactly as ``handle(JobSubmitted)`` / ``handle(JobReported)``.
* The codec pickles a small bulky message with ``pickle.dumps`` (faster for small pickles) and
  a large one through a BytesIO: both decode to the message, large blobs out of band.
* A connection writes what the handler sent while handling a read's payloads once they are
  handled (no loop iteration of its own), and ``send(now=True)`` at once.
* A job reported by its end alone still goes through Running where that can be seen (the
  ``_job_started`` hook of compat.dispy); otherwise its report alone sets its fields.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket

import clusterpy
from clusterpy.core.scheduler import (
    DeliverResult,
    DispatchJobs,
    JobReported,
    JobsStarted,
    JobSubmitted,
    NodeJoined,
    NodeLost,
    SchedulerCore,
)
from clusterpy.job import JobStatus
from clusterpy.protocol import codec, outofband
from clusterpy.protocol import messages as m
from clusterpy.transport.stream import Connection

from .test_stream import Server


def _dispatched(actions):
    return [(a.node_id, job) for a in actions if isinstance(a, DispatchJobs) for job in a.jobs]


def test_core_entries_decide_as_the_events_do():
    # Two cores fed the same random history, one through handle() only, one through the
    # entries; every decision and every invariant must agree.
    rng = random.Random(7)
    for prefetch in (None, 0, 1):
        by_event = SchedulerCore(prefetch=prefetch, reentrant=True)
        by_entry = SchedulerCore(prefetch=prefetch, reentrant=True)
        sent: list[tuple[str, str, int]] = []  # (node, job, attempt) in flight
        nodes = 0
        for step in range(3000):
            roll = rng.random()
            if nodes < 3 and roll < 0.01 or nodes == 0:
                nodes += 1
                event = NodeJoined(f"n{nodes}", rng.randint(1, 3))
                a, b = by_event.handle(event), by_entry.handle(event)
            elif roll < 0.5:
                job_id = f"j{step}"
                a, b = by_event.handle(JobSubmitted(job_id)), by_entry.submit(job_id)
            elif roll < 0.52 and sent:
                node, job_id, attempt = rng.choice(sent)
                started = JobsStarted(node, ((job_id, attempt),))
                a, b = by_event.handle(started), by_entry.handle(started)
            elif roll < 0.525 and nodes > 1:
                victim = f"n{rng.randint(1, nodes)}"
                lost = NodeLost(victim, "test")
                a, b = by_event.handle(lost), by_entry.handle(lost)
                sent = [s for s in sent if s[0] != victim]
            elif sent:
                node, job_id, attempt = sent.pop(rng.randrange(len(sent)))
                died = rng.random() < 0.05
                duration = rng.choice([None, 0.0001, 0.001, 0.003, 0.5])
                a = by_event.handle(JobReported(node, job_id, attempt, died, duration))
                current, actions = by_entry.report(node, job_id, attempt, died, duration)
                b = [DeliverResult(job_id, attempt), *actions] if current else actions
                if rng.random() < 0.05:  # a late duplicate of the same report: discarded by both
                    assert by_event.handle(JobReported(node, job_id, attempt)) == []
                    assert by_entry.report(node, job_id, attempt) == (False, [])
            else:
                continue
            assert a == b, (step, a, b)
            sent.extend((node, job_id, attempt) for node, (job_id, attempt) in _dispatched(a))
            by_event.validate()
            by_entry.validate()
        assert by_event.pending() == by_entry.pending() and by_event.queued() == by_entry.queued()


def test_adaptive_prefetch_formula_without_its_division():
    from clusterpy.core.scheduler import MAX_AHEAD, SHORT_JOB, _ahead_for

    for typical in [1e-7, 1e-5, SHORT_JOB / 4, SHORT_JOB / 3.5, SHORT_JOB / 3, SHORT_JOB / 2.5, SHORT_JOB / 2,
                    SHORT_JOB / 1.5, SHORT_JOB * 0.999, SHORT_JOB, SHORT_JOB * 2, 10.0]:
        assert _ahead_for(typical) == min(MAX_AHEAD, max(1, math.ceil(SHORT_JOB / max(typical, 1e-9)))), typical


def _done(result, traceback=None):
    return m.JobDone("c1", "7", 1, "finished", result, None, None, None, traceback, b"out", b"", 1.0, 2.0, 0.1, None)


def test_both_encodings_of_bulky_messages_decode_to_the_message():
    big = os.urandom(outofband.MIN_SIZE + 1)
    batch = [m.JobRequest(str(i), 1, os.urandom(100), None, 1) for i in range(codec._SMALL_BATCH + 1)]
    messages = [
        _done(b"\x80\x05K\x02."), _done(big), _done((b"pickle", big)), _done(None, traceback="x" * 100_000),
        m.SubmitJobs("c1", tuple(batch[:codec._SMALL_BATCH])), m.SubmitJobs("c1", tuple(batch)),
        m.SubmitJobs("c1", (m.JobRequest("1", 1, big, 5.0, 2),)),
        m.JobProgress("c1", "7", 1, big), m.FileChunk("c1", "ab" * 32, b"chunk", True),
    ]
    for message in messages:
        for parts in (codec.encode_parts(message), outofband.dumps(message)):
            assert outofband.is_out_of_band(parts[0]) == (len(parts) > 1)
            for part in parts[1:]:
                assert len(part) >= outofband.MIN_SIZE  # large blobs travel as parts of their own
            decoded = codec.decode(b"".join(parts))
            assert type(decoded) is type(message) and decoded == message  # views compare as bytes


def _peer_has_data(conn: Connection) -> bool:
    """Whether bytes written by the other end wait in ``conn``'s socket (not read yet)."""
    fd = conn._transport.get_extra_info("socket").fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False


async def test_replies_to_a_read_leave_when_its_payloads_are_handled():
    loop = asyncio.get_running_loop()
    seen: list[bool] = []
    answered = asyncio.Event()
    client: list[Connection] = []

    async def handler(conn: Connection) -> None:
        def eager(payload: bytes | bytearray) -> bool:
            # Runs before the reply is sent; it runs after the read callback that handles
            # this payload, and must find the reply already on its way.
            loop.call_soon(lambda: (seen.append(_peer_has_data(client[0])), answered.set()))
            conn.send(b"reply to " + bytes(payload))
            return True

        conn.deliver_eagerly(eager)
        while True:
            await conn.recv()

    async with asyncio.timeout(15), Server(handler) as srv:
        async with await srv.connect() as conn:
            client.append(conn)
            conn.send(b"hello", now=True)  # written at once: nothing left queued
            assert not conn._corked
            await asyncio.wait_for(answered.wait(), 5)
            assert await asyncio.wait_for(conn.recv(), 5) == b"reply to hello"
    assert seen == [True]


def test_a_job_reported_by_its_end_alone_is_seen_started(node):
    started: list[tuple[object, JobStatus]] = []

    class Watched(clusterpy.JobCluster):
        def _job_started(self, job, link):  # the hook compat.dispy overrides
            started.append((job.id, job.status))

    with Watched(_plus_one, nodes=[node.address]) as cluster:
        jobs = [cluster.submit(i) for i in range(20)]
        assert [job() for job in jobs] == list(range(1, 21))
    assert sorted(i for i, _ in started) == sorted(job.id for job in jobs)  # every job, once
    assert {status for _, status in started} == {JobStatus.Running}

    with clusterpy.JobCluster(_plus_one, nodes=[node.address]) as cluster:
        plain = [cluster.submit(i) for i in range(10)]  # nobody watches: the report sets it all
        assert [job() for job in plain] == list(range(1, 11))
    for job in plain:
        assert job.status is JobStatus.Finished and job.ip_addr == "127.0.0.1" and job.node_id == node.node_id
        assert job.start_time is not None and job.end_time >= job.start_time


def _plus_one(x):
    return x + 1
