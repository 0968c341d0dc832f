"""A job that ends with nothing else running on its node: its report is written in the loop
turn that read its worker's reply (Outbox.deliver(..., last=True)), not one turn later, and a
lone job is written to its worker before its start is noted (RunQueue._start).

Shown on a node's ClientSession over a real loopback connection (the bytes are in the peer's
socket before the loop turns), and on an in-process node with real workers (which reports the
run queue marks as the last of their turn).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket

from clusterpy import _node_reports
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m

from .test_jobs_done_batch import pair, report  # noqa: F401 (fixture)
from .test_node_run_queue import COMP, deploy, hard_timeout, node, receive  # noqa: F401 (fixtures)


def peer_bytes(pair) -> int:  # noqa: F811
    """Bytes waiting in the client's socket, read by nobody yet (the loop has not turned)."""
    sock = pair.client._transport.get_extra_info("socket")
    with socket.socket(fileno=os.dup(sock.fileno())) as peek:
        try:
            return len(peek.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return 0


async def test_a_last_report_is_written_at_once_with_those_held_before_it(pair):  # noqa: F811
    session = pair.session
    await asyncio.sleep(0.05)  # nothing in flight
    session.deliver(report("a", pickle.dumps(1)))
    session.deliver(report("b", pickle.dumps(2)))
    assert peer_bytes(pair) == 0  # held for the end of the loop turn
    session.deliver(report("c", pickle.dumps(3)), last=True)
    assert peer_bytes(pair) > 0  # written now, before the loop turns
    got = await pair.receive()
    assert type(got) is m.JobsDone and [r.job_id for r in got.reports] == ["a", "b", "c"]
    await pair.nothing_more()


async def test_a_lone_last_report_is_a_job_done_written_at_once(pair):  # noqa: F811
    pair.session.deliver(report("alone"), last=True)
    assert peer_bytes(pair) > 0
    assert await pair.receive() == report("alone")
    big = os.urandom(1 << 20)  # a large one too (it never waits for the others)
    pair.session.deliver(report("big", big), last=True)
    assert peer_bytes(pair) > 0
    got = await pair.receive()
    assert got.job_id == "big" and bytes(got.result) == big


async def test_the_run_queue_marks_a_report_last_only_when_nothing_else_runs(node, monkeypatch):  # noqa: F811
    marks: list[tuple[str, bool]] = []
    deliver = _node_reports.Outbox.deliver

    def spying_deliver(self, message, key=None, *, last=False):
        if type(message) is m.JobDone:
            marks.append((message.job_id, last))
        return deliver(self, message, key, last=last)

    monkeypatch.setattr(_node_reports.Outbox, "deliver", spying_deliver)
    conn = await deploy(node)
    try:
        for job_id in ("lone1", "lone2"):  # one at a time: each the only job on the node
            conn.send(codec.encode(m.SubmitJobs(COMP, (m.JobRequest(job_id, 1, pickle.dumps((("0",), {}), protocol=5)),))))
            done = await receive(conn)
            while type(done) is m.JobsStarted:  # the first job loads the computation: it may be reported started
                done = await receive(conn)
            assert (type(done), done.job_id, done.status) == (m.JobDone, job_id, "finished"), done
        # Two at once on the node's two CPUs: the short one ends while the long one runs.
        conn.send(codec.encode(m.SubmitJobs(COMP, (m.JobRequest("long", 1, pickle.dumps((("0.5",), {}), protocol=5)),
                                                   m.JobRequest("short", 1, pickle.dumps((("0",), {}), protocol=5))))))
        ended = []
        while len(ended) < 2:
            got = await receive(conn)
            if type(got) is m.JobDone:
                ended.append(got.job_id)
        assert ended == ["short", "long"]
    finally:
        await conn.aclose()
    assert marks == [("lone1", True), ("lone2", True), ("short", False), ("long", True)]
