"""Job reports that leave a node in one write travel as one JobsDone (_node_reports.Outbox.deliver).

Shown on the codec; on a node's ClientSession over a real loopback Connection (what one loop
turn's reports become on the wire, their order against other messages, a connection that
breaks with reports held); through real node and scheduler processes; and against a node
played by hand over the real authenticated transport, which sends forged batches (refused:
the client drops the link, as for any node lost) and batched results to ``recover_jobs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy.errors import ClusterError, ConnectionClosedError, ProtocolError
from clusterpy.identity import local_info
from clusterpy.node_session import ClientSession, Computation
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.protocol.outofband import MARK
from clusterpy.recovery import recover_jobs_async
from clusterpy.shared import SharedJobCluster
from clusterpy.transport.stream import Connection, accept, connect

from .conftest import SECRET
from .test_shared import start_scheduler  # noqa: F401 (fixture)

KEY = SECRET.encode()


def report(job_id: str, result: Any = b"r", comp_id: str = "c1", traceback: str | None = None) -> m.JobDone:
    return m.JobDone(comp_id, job_id, 1, "finished", result, None, None, None, traceback, b"", b"",
                     1.0, 2.0, 0.1, None)


# ------------------------------------------------------------------------------------- codec


def test_a_few_reports_pickle_small_in_band_and_come_back_equal():
    batch = m.JobsDone("c1", tuple(report(str(i), pickle.dumps(i)) for i in range(5)))
    parts = codec.encode_parts(batch)
    assert len(parts) == 1 and parts[0][0] != MARK  # one in-band pickle
    assert codec.decode(parts[0]) == batch
    many = m.JobsDone("c1", tuple(report(str(i), traceback="Traceback ..." if i == 3 else None) for i in range(40)))
    assert codec.decode(codec.encode(many)) == many  # the general (BytesIO pickler) path


def test_large_results_in_a_batch_stay_out_of_band_buffers_not_copies():
    big = [os.urandom(1 << 20), os.urandom(1 << 20)]
    batch = m.JobsDone("c1", (report("a", big[0]), report("b", b"small"), report("c", big[1])))
    parts = codec.encode_parts(batch)
    # Each 1 MB result is a part of its own: the very bytes object, not a copy in the pickle.
    assert [p.obj for p in parts if isinstance(p, memoryview)] == big
    assert len(parts[0]) < 4096
    frame = bytearray(b"".join(parts))  # as a large frame is received
    decoded = codec.decode(frame)
    assert [r.job_id for r in decoded.reports] == ["a", "b", "c"]
    assert isinstance(decoded.reports[0].result, memoryview) and decoded.reports[0].result.obj is frame
    assert bytes(decoded.reports[0].result) == big[0] and bytes(decoded.reports[2].result) == big[1]
    assert decoded.reports[1].result == b"small"


@pytest.mark.parametrize("forged", [
    m.JobsDone("c1", (report("a"), m.JobStart("b", 1, 0.0))),
    m.JobsDone("c1", (report("a"), report("b", comp_id="c2"))),
    m.JobsDone("c1", (report("a"), m.JobsDone("c1", (report("b"),)))),
    m.JobsDone("c1", [report("a")]),  # type: ignore[arg-type]
], ids=["not-a-report", "other-computation", "nested", "a-list"])
def test_the_codec_refuses_a_batch_that_holds_anything_but_reports_of_its_computation(forged):
    payload = pickle.dumps(forged, protocol=5)  # as a hostile peer would make it (encode would not)
    with pytest.raises(ProtocolError, match="JobsDone"):
        codec.decode(payload)


# ------------------------------------------------------------------ a session's connection


class _Node:
    """What a ClientSession asks of its node here: the computations and the kept-results budget."""

    def __init__(self, kept_dir: Path) -> None:
        self.comps: dict[str, Computation] = {}
        self.kept_dir = kept_dir
        self.max_kept_bytes = 1 << 30


class Pair:
    """A node-side ClientSession and the client's end of its real, authenticated connection."""

    session: ClientSession
    client: Connection
    node_transport: asyncio.Transport

    @classmethod
    async def open(cls, tmp_path: Path) -> "Pair":
        pair = cls()
        accepted: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            pair.node_transport = writer.transport  # type: ignore[assignment]
            accepted.set_result(await accept(reader, writer, secret=KEY, role="node", info=local_info()))

        pair.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = pair.server.sockets[0].getsockname()[1]
        pair.client = await connect("127.0.0.1", port, secret=KEY, role="client", info=local_info())
        pair.node = _Node(tmp_path)
        pair.session = ClientSession(pair.node, await accepted)  # type: ignore[arg-type]
        for comp_id in ("c1", "c2"):
            comp = Computation(comp_id, None, tmp_path, tmp_path / f"kept-{comp_id}", owner=pair.session)  # type: ignore[arg-type]
            pair.node.comps[comp_id] = pair.session.comps[comp_id] = comp
        return pair

    async def receive(self) -> object:
        async with asyncio.timeout(5):
            return codec.decode(await self.client.recv())

    async def nothing_more(self) -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                got = codec.decode(await self.client.recv())
                pytest.fail(f"unexpected {got}")

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.session.conn.aclose()
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def pair(tmp_path):
    pair = await Pair.open(tmp_path)
    try:
        async with asyncio.timeout(30):
            yield pair
    finally:
        await pair.aclose()


async def test_the_reports_of_one_loop_turn_leave_as_one_jobs_done(pair):
    for i in range(5):  # one loop turn: no await in between
        pair.session.deliver(report(str(i), pickle.dumps(i)))
    got = await pair.receive()
    assert type(got) is m.JobsDone and got.comp_id == "c1"
    assert [r.job_id for r in got.reports] == ["0", "1", "2", "3", "4"]
    assert [pickle.loads(r.result) for r in got.reports] == [0, 1, 2, 3, 4]
    await pair.nothing_more()
    pair.session.deliver(report("alone"))  # a lone report is a JobDone, not a batch of one
    assert await pair.receive() == report("alone")


async def test_other_messages_leave_after_the_reports_held_before_them(pair):
    session = pair.session
    session.deliver(report("a"))
    session.deliver(report("b"))
    session.deliver(m.JobProgress("c1", "c", 1, b"half way"))  # sends the held reports first
    session.deliver(report("d"))
    session.send(m.Pong(1.0))
    session.deliver(report("e"))
    got = [await pair.receive() for _ in range(5)]
    assert [type(x).__name__ for x in got] == ["JobsDone", "JobProgress", "JobDone", "Pong", "JobDone"]
    assert [r.job_id for r in got[0].reports] == ["a", "b"]
    assert (got[2].job_id, got[4].job_id) == ("d", "e")


async def test_reports_are_grouped_per_computation_in_order(pair):
    for job_id, comp_id in [("a1", "c1"), ("b1", "c2"), ("a2", "c1"), ("b2", "c2"), ("a3", "c1")]:
        pair.session.deliver(report(job_id, comp_id=comp_id))
    first, second = await pair.receive(), await pair.receive()
    assert (first.comp_id, [r.job_id for r in first.reports]) == ("c1", ["a1", "a2", "a3"])
    assert (second.comp_id, [r.job_id for r in second.reports]) == ("c2", ["b1", "b2"])


async def test_a_large_result_is_not_held_and_keeps_its_out_of_band_path(pair):
    big = os.urandom(1 << 20)
    pair.session.deliver(report("small"))
    pair.session.deliver(report("big", big))  # sends "small" first, then itself, alone
    pair.session.deliver(report("after"))
    small, large, after = [await pair.receive() for _ in range(3)]
    assert small == report("small") and after == report("after")
    assert type(large) is m.JobDone and isinstance(large.result, memoryview) and bytes(large.result) == big


async def test_a_batch_leaves_early_past_its_budget(pair):
    for i in range(100):
        pair.session.deliver(report(str(i)))
    first, second = await pair.receive(), await pair.receive()
    assert (len(first.reports), len(second.reports)) == (64, 36)
    assert [r.job_id for r in first.reports + second.reports] == [str(i) for i in range(100)]


async def test_deliver_raises_when_the_connection_is_closed(pair):
    pair.session.conn.close()
    with pytest.raises(ConnectionClosedError):
        pair.session.deliver(report("late"))  # the node keeps it instead (RunQueue._report)


async def test_held_reports_are_kept_for_the_client_when_the_connection_breaks_before_they_leave(pair):
    session = pair.session
    session.deliver(report("a", pickle.dumps("A")))
    session.deliver(report("b", pickle.dumps("B")))
    pair.node_transport.abort()  # the connection breaks (a reset) before the write
    await asyncio.sleep(0.05)  # the flush: the connection refuses the batch
    comp = pair.node.comps["c1"]
    assert comp.kept == 2
    kept = list(comp.take_kept())  # what a returning client gets after AttachComputation
    assert [(r.job_id, pickle.loads(r.result)) for r in kept] == [("a", "A"), ("b", "B")]
    with pytest.raises(ConnectionClosedError):
        session.deliver(report("c"))  # broken now: the caller keeps it


async def test_a_report_past_the_kept_results_budget_is_kept_as_result_dropped(pair):
    pair.node.max_kept_bytes = 100
    pair.session.deliver(report("big", pickle.dumps(b"x" * 1000)))
    pair.node_transport.abort()  # the client is gone before the report leaves
    await asyncio.sleep(0.05)
    kept = list(pair.node.comps["c1"].take_kept())
    assert [(r.job_id, r.status, r.exc_type, r.result, r.stdout) for r in kept] == [
        ("big", "exception", "ResultDropped", None, b"")]
    assert "node's budget for kept results was full" in kept[0].exc_message


def test_a_dropped_report_keeps_its_job_and_times_and_may_change_its_attempt():
    done = report("j", pickle.dumps("R"))
    dropped = done.dropped("scheduler", attempt=7)
    assert (dropped.comp_id, dropped.job_id, dropped.attempt, dropped.status) == ("c1", "j", 7, "exception")
    assert (dropped.start_time, dropped.end_time, dropped.cpu_time) == (done.start_time, done.end_time, done.cpu_time)
    assert dropped.result is None and "scheduler's budget" in dropped.exc_message
    assert done.dropped("node").attempt == done.attempt


# --------------------------------------------------------------------- real processes


def inc(x):
    return x + 1


def inc_at(x, when):
    """x + 1, returned at the wall-clock time ``when``: jobs given the same time end together."""
    import time

    time.sleep(max(0.0, when - time.time()))
    return x + 1


def test_many_short_jobs_on_a_real_node_arrive_batched_all_correct(node, monkeypatch):
    reports: list[str] = []  # job ids of every report the client received, in order
    batches: list[int] = []
    lock = threading.Lock()
    decode = codec.decode

    def spying_decode(payload):
        message = decode(payload)
        with lock:
            if type(message) is m.JobsDone:
                batches.append(len(message.reports))
                reports.extend(r.job_id for r in message.reports)
            elif type(message) is m.JobDone:
                reports.append(message.job_id)
        return message

    monkeypatch.setattr(codec, "decode", spying_decode)
    with clusterpy.JobCluster(inc_at, nodes=[node.address]) as cluster:
        jobs = [cluster.submit(i, 0.0) for i in range(600)]
        assert [job(30) for job in jobs] == list(range(1, 601))
        assert all(job.status is JobStatus.Finished and job.node_id == node.node_id for job in jobs)
        # Whether two reports leave in one write depends on timing: two jobs that end at the
        # same moment on the two CPUs nearly always do (a round does ~80% of the time here).
        for _ in range(20):
            with lock:
                if batches:
                    break
            when = time.time() + 0.05
            pair = [cluster.submit(i, when) for i in range(2)]
            assert [job(30) for job in pair] == [1, 2]
            jobs += pair
    with lock:
        assert sorted(reports) == sorted(job._key for job in jobs)  # each report once
        assert batches and max(batches) >= 2, "no two reports ever left the node in one write"


def test_shared_job_cluster_through_a_real_scheduler_gets_every_result(start_node, start_scheduler):
    sched = start_scheduler([start_node(cpus=2)])
    with SharedJobCluster(inc, sched.address, pulse_interval=0.5) as cluster:
        jobs = [cluster.submit(i) for i in range(300)]
        assert [job(60) for job in jobs] == list(range(1, 301))
        assert all(job.status is JobStatus.Finished for job in jobs)


# ------------------------------------------------------------------ a node played by hand


class FakeNode:
    """A node played by hand over the real authenticated transport (real sockets, the real
    handshake with the shared secret): it deploys anything, records the jobs it is sent, and
    answers them (or an AttachComputation) as the test says."""

    def __init__(self, on_jobs: Callable[["FakeNode", Connection, m.SubmitJobs], Awaitable[None]],
                 on_attach: Callable[["FakeNode", Connection, str], Awaitable[None]] | None = None,
                 cpus: int = 2) -> None:
        self.node_id = uuid.uuid4().hex[:12]
        self.cpus = cpus
        self.on_jobs, self.on_attach = on_jobs, on_attach
        self.connections = 0
        self.requests: list[m.JobRequest] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> "FakeNode":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            conn = await accept(reader, writer, secret=KEY, role="node", expected_peer_roles={"client"},
                                info=local_info(node_id=self.node_id, cpus=self.cpus, score=1.0))
            self.connections += 1
            async with conn:
                while True:
                    msg = codec.decode(await conn.recv())
                    if isinstance(msg, m.DeployComputation):
                        conn.send(codec.encode(m.FilesNeeded(msg.comp_id, ())))
                        conn.send(codec.encode(m.ComputationReady(msg.comp_id)))
                    elif isinstance(msg, m.SubmitJobs):
                        self.requests.extend(msg.jobs)
                        await self.on_jobs(self, conn, msg)
                    elif isinstance(msg, m.AttachComputation) and self.on_attach is not None:
                        await self.on_attach(self, conn, msg.comp_id)
                    elif isinstance(msg, m.Ping):
                        conn.send(codec.encode(m.Pong(msg.sent)))
        except ClusterError:
            pass  # the client went away (or was refused)
        finally:
            self._handlers.discard(task)

    async def aclose(self) -> None:
        self.server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()


def answer(comp_id: str, request: m.JobRequest, value: object) -> m.JobDone:
    now = time.time()
    return m.JobDone(comp_id, request.job_id, request.attempt, "finished", pickle.dumps(value), None, None, None,
                     None, b"", b"", now, now, 0.0, None)


def plus_one(request: m.JobRequest) -> int:
    (x,), _ = pickle.loads(request.args)
    return x + 1


FORGERIES = {
    "not-a-report": lambda comp_id, req: m.JobStart(req.job_id, req.attempt, 0.0),
    "other-computation": lambda comp_id, req: answer("c" + uuid.uuid4().hex, req, -1),
}


@pytest.mark.parametrize("forgery, reentrant", [("not-a-report", True), ("other-computation", True),
                                                ("not-a-report", False)])
async def test_a_forged_jobs_done_is_refused_and_the_link_dropped(forgery, reentrant, caplog):
    """No report of a forged batch is taken (those that look right carry a wrong value); the
    client drops the link, logs why, and its jobs run again (reentrant) or end abandoned, as
    for any node lost with jobs on it."""
    async def on_jobs(node: FakeNode, conn: Connection, msg: m.SubmitJobs) -> None:
        jobs = msg.jobs
        if node.connections == 1:
            forged = [answer(msg.comp_id, req, -1) for req in jobs[:-1]]
            forged.append(FORGERIES[forgery](msg.comp_id, jobs[-1]))
            conn.send(pickle.dumps(m.JobsDone(msg.comp_id, tuple(forged)), protocol=5))  # type: ignore[arg-type]
        else:
            conn.send(codec.encode(m.JobsDone(msg.comp_id, tuple(answer(msg.comp_id, req, plus_one(req))
                                                                 for req in jobs))))

    def client(address: str) -> list[tuple[JobStatus, object, str]]:
        with clusterpy.JobCluster(inc, nodes=[address], pulse_interval=0.2, reentrant=reentrant) as cluster:
            jobs = [cluster.submit(i) for i in range(4)]
            for job in jobs:
                try:
                    job(30)
                except ClusterError:
                    pass  # abandoned: its status says so
            return [(job.status, job.result, str(job.exception)) for job in jobs]

    caplog.set_level(logging.WARNING, logger="clusterpy")
    node = await FakeNode(on_jobs).start()
    try:
        async with asyncio.timeout(60):
            ends = await asyncio.to_thread(client, node.address)
    finally:
        await node.aclose()
    refusals = [r.getMessage() for r in caplog.records if r.name == "clusterpy.nodelink" and "JobsDone" in r.getMessage()]
    assert refusals and f"link to {node.address} failed: JobsDone" in refusals[0], caplog.text
    assert all(result != -1 for _, result, _ in ends)
    if reentrant:
        assert ends == [(JobStatus.Finished, i + 1, "None") for i in range(4)]
        assert node.connections >= 2  # the client came back
        assert len({req.attempt for req in node.requests}) >= 2  # and the jobs ran again
    else:
        assert {status for status, _, _ in ends} <= {JobStatus.Abandoned, JobStatus.Finished}
        lost = [text for status, _, text in ends if status is JobStatus.Abandoned]
        assert lost and all("JobsDone holds a JobStart" in text for text in lost)


CRASHING_CLIENT = textwrap.dedent("""
    import os, signal, sys
    import clusterpy

    def inc(x):
        return x + 1

    cluster = clusterpy.JobCluster(inc, nodes=[sys.argv[1]], recover_file=sys.argv[2])
    jobs = [cluster.submit(i) for i in range(6)]
    import time
    deadline = time.monotonic() + 20
    while os.path.getsize(sys.argv[3]) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(os.getpid(), signal.SIGKILL)
""")


async def test_recover_jobs_takes_reports_that_come_batched(tmp_path, monkeypatch):
    """A client dies with six jobs on a node; re-attached, the node sends their results as one
    JobsDone (jobs that ended while it was attached): recover_jobs takes each report."""
    jobs_seen = tmp_path / "seen"
    jobs_seen.write_bytes(b"")
    attached: list[str] = []

    async def on_jobs(node: FakeNode, conn: Connection, msg: m.SubmitJobs) -> None:
        with open(jobs_seen, "ab") as f:
            f.write(b"x" * len(msg.jobs))  # the client waits for this before it dies

    async def on_attach(node: FakeNode, conn: Connection, comp_id: str) -> None:
        attached.append(comp_id)
        pending = tuple((req.job_id, req.attempt) for req in node.requests)
        conn.send(codec.encode(m.Attached(comp_id, pending, 0)))
        await asyncio.sleep(0.05)  # they end while the client is attached
        conn.send(codec.encode(m.JobsDone(comp_id, tuple(answer(comp_id, req, plus_one(req))
                                                          for req in node.requests))))

    script = tmp_path / "client.py"
    script.write_text(CRASHING_CLIENT)
    journal = tmp_path / "journal.pkl"
    node = await FakeNode(on_jobs, on_attach, cpus=8).start()  # takes all six jobs at once
    try:
        async with asyncio.timeout(60):
            proc = await asyncio.create_subprocess_exec(sys.executable, str(script), node.address, str(journal),
                                                        str(jobs_seen), cwd=tmp_path, stderr=subprocess.PIPE)
            _, stderr = await proc.communicate()
            assert proc.returncode == -signal.SIGKILL, stderr.decode()
            assert len(node.requests) == 6
            jobs = await recover_jobs_async(journal, timeout=20)
    finally:
        await node.aclose()
    assert len(attached) == 1
    assert [(j.status, j.result) for j in jobs] == [(JobStatus.Finished, i + 1) for i in range(6)]
