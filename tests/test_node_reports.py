"""What a real node tells its client while jobs run: a JobsStarted only for jobs still running
START_REPORT_DELAY after they started (a short job's JobDone says it all)."""

from __future__ import annotations

import threading
import time

import clusterpy
from clusterpy import JobStatus
from clusterpy.node_session import START_REPORT_DELAY
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_only_jobs_running_past_the_delay_are_reported_started(node, monkeypatch):
    started: list[str] = []  # wire job ids (ClusterJob._key) in the JobsStarted the client received
    lock = threading.Lock()
    decode = codec.decode

    def spying_decode(payload):
        message = decode(payload)
        if isinstance(message, m.JobsStarted):
            with lock:
                started.extend(s.job_id for s in message.jobs)
        return message

    monkeypatch.setattr(codec, "decode", spying_decode)
    with clusterpy.JobCluster(nap, nodes=[node.address]) as cluster:
        for job in [cluster.submit(0) for _ in range(5)]:
            job(10)  # warm: both workers have the computation
        short = [cluster.submit(0) for _ in range(300)]
        assert [job(10) for job in short] == [0] * 300
        long = cluster.submit(0.5)
        deadline = time.monotonic() + 5
        while long.status is not JobStatus.Running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert long.status is JobStatus.Running  # reported while it runs, not by its end
        assert long(10) == 0.5
    with lock:
        assert long._key in started
        # A trivial job ends within START_REPORT_DELAY (2 ms) but when its worker stalls on
        # this shared machine. (When every job running as the timer fired was reported, 67 of
        # the 300 were.)
        assert START_REPORT_DELAY == 0.002
        reported_short = len({j._key for j in short} & set(started))
    assert reported_short <= 30, f"{reported_short} of 300 short jobs were reported started"
