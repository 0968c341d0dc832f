"""The node's run queue (clusterpy._runqueue: RunQueue.enqueue/_pump), driven over a real
connection to an in-process node with real worker processes: strict FIFO over CPU slots, and a
job that leaves the head of the queue (cancelled, or recalled by work stealing) lets the jobs
behind it start at once instead of when the next running job ends."""

from __future__ import annotations

import asyncio
import hashlib
import pickle

import pytest

from clusterpy.identity import local_info
from clusterpy.node import NodeServer
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.transport.stream import Connection, connect

KEY = b"run-queue-test-secret-0123456789"
COMP = "c-run-queue"
SCRIPT = b'#!/bin/sh\nsleep "$1"\n'
LONG = 3.0  # seconds job "a" runs: far longer than starting and running a "sleep 0"


@pytest.fixture(autouse=True)
async def hard_timeout():
    async with asyncio.timeout(60):
        yield


@pytest.fixture
async def node(tmp_path):
    node = NodeServer(secret=KEY, port=0, cpus=2, dest_path=tmp_path / "node", discovery=False, score=1.0)
    await node.start()
    try:
        yield node
    finally:
        await node.aclose()


async def receive(conn: Connection) -> object:
    async with asyncio.timeout(20):
        return codec.decode(await conn.recv())


async def deploy(node: NodeServer, script: bytes = SCRIPT) -> Connection:
    """A client connection with a ready program computation: ``run.sh SECONDS`` sleeps (or
    runs ``script``)."""
    conn = await connect("127.0.0.1", node.port, secret=KEY, role="client", info=local_info(),
                         expected_peer_roles={"node"})
    sha = hashlib.sha256(script).hexdigest()
    conn.send(codec.encode(m.DeployComputation(COMP, "program", (m.FileMeta("run.sh", sha, len(script), 0o755),),
                                               None, ("run.sh",))))
    needed = await receive(conn)
    assert isinstance(needed, m.FilesNeeded) and needed.sha256s == (sha,)
    conn.send(codec.encode(m.FileChunk(COMP, sha, script, True)))
    assert isinstance(await receive(conn), m.ComputationReady)
    return conn


async def receive_end(conn: Connection) -> object:
    """The next message that is not a JobsStarted (a job that runs a program runs past
    START_REPORT_DELAY)."""
    while isinstance(message := await receive(conn), m.JobsStarted):
        pass
    return message


def request(job_id: str, seconds: float, cpus: int = 1) -> m.JobRequest:
    return m.JobRequest(job_id, 0, pickle.dumps(((seconds,), {}), protocol=5), None, cpus)


@pytest.mark.parametrize("leave", ["cancel", "recall"])
async def test_a_job_leaving_the_head_of_the_queue_lets_the_jobs_behind_it_start(node, leave):
    conn = await deploy(node)
    async with conn:
        conn.send(codec.encode(m.SubmitJobs(COMP, (request("a", LONG),))))
        started = await receive(conn)  # a runs past START_REPORT_DELAY
        assert isinstance(started, m.JobsStarted) and started.jobs[0].job_id == "a"
        # b needs both CPUs: it waits at the head for a's. c needs one, and one is free, but
        # it may not pass b (strict FIFO: a stream of 1-CPU jobs must not starve b).
        conn.send(codec.encode(m.SubmitJobs(COMP, (request("b", 0.0, cpus=2), request("c", 0.0)))))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                got = codec.decode(await conn.recv())
                pytest.fail(f"nothing may run while b waits for a's CPU, but the node sent {got}")
        assert node.status_reply().queued == 2
        if leave == "cancel":
            conn.send(codec.encode(m.CancelJob(COMP, "b", 0)))
            cancelled = await receive(conn)
            assert isinstance(cancelled, m.JobDone) and (cancelled.job_id, cancelled.status) == ("b", "cancelled")
        else:
            conn.send(codec.encode(m.RecallJobs(COMP, (("b", 0),))))
            assert await receive(conn) == m.JobsRecalled(COMP, (("b", 0),))
        # c starts now, on the CPU a leaves free: it ends long before a does.
        done = await receive_end(conn)
        assert isinstance(done, m.JobDone) and (done.job_id, done.status) == ("c", "finished"), done
        status = node.status_reply()
        assert (status.busy, status.busy_cpus, status.queued) == (1, 1, 0)  # a, still
        done = await receive_end(conn)
        assert isinstance(done, m.JobDone) and (done.job_id, done.status) == ("a", "finished"), done
        status = node.status_reply()
        assert (status.busy, status.busy_cpus, status.queued, status.jobs_done) == (0, 0, 0, 2)  # a and c ran
