"""Early exit (map stop_when, cluster.stop) and only_if, against real nodes on loopback."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import clusterpy
from clusterpy.core.scheduler import MAX_AHEAD
from clusterpy import JobStatus
from clusterpy.errors import JobCancelledError
from clusterpy.secret import load_secret
from clusterpy.status import query_nodes

from .conftest import REPO

NEEDLE = 2345
CHUNK = 50


def is_needle(candidate):
    import time

    time.sleep(0.002)  # each candidate costs a little: a full search takes seconds
    return candidate if candidate == NEEDLE else None


def slow_square(n):
    import time

    time.sleep(0.05 if n == 1 else 0.4)
    return n * n


def square(n):
    return n * n


def node_load(nodes):
    """(busy, queued) of every node, asked of the nodes themselves."""
    replies = asyncio.run(query_nodes([(n.host, n.port) for n in nodes], secret=load_secret()))
    return [(s.reply.busy, s.reply.queued) for s in replies]


def test_a_search_over_10000_candidates_stops_soon_after_the_needle(start_node):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    with clusterpy.JobCluster(is_needle, nodes=[n.address for n in nodes], only_if=lambda r: r is not None) as cluster:
        found = cluster.map(range(10_000), chunksize=CHUNK, stop_when=lambda r: r == NEEDLE)
        results = list(found)
        # The iterator ended only once none of its jobs was queued or running anywhere.
        assert node_load(nodes) == [(0, 0), (0, 0)]
        assert all(n["busy"] == 0 for n in cluster.nodes())
        stats = cluster.stats()
    assert results == [NEEDLE] and found.stopped and found.stopped_by == NEEDLE
    needle_job = NEEDLE // CHUNK  # 0-based: 46 jobs come before it
    ahead = MAX_AHEAD if cluster.prefetch is None else cluster.prefetch  # None: adaptive, up to MAX_AHEAD
    slots = 2 * 2 * (1 + ahead)  # jobs the nodes hold at once
    assert found.jobs_submitted <= needle_job + 1 + found.window < 10_000 // CHUNK
    finished = [j for j in stats.jobs if j.status == "Finished"]
    cancelled = [j for j in stats.jobs if j.status == "Cancelled"]
    assert len(finished) + len(cancelled) == found.jobs_submitted
    # Bounded extra work: beyond the needle's job, at most what the nodes already held ran to the end.
    assert len(finished) <= needle_job + 1 + slots
    assert cancelled and stats.stops == 1


def test_cluster_stop_from_a_callback_cancels_queued_and_terminates_running(node):
    holder = {}
    stopped = threading.Event()

    def callback(job):
        if job.status is JobStatus.Finished and job.result == 1:
            holder["count"] = holder["cluster"].stop()
            stopped.set()

    with clusterpy.JobCluster(slow_square, nodes=[node.address], callback=callback) as cluster:
        holder["cluster"] = cluster
        jobs = [cluster.submit(n) for n in range(1, 21)]
        assert stopped.wait(10)
        assert cluster.wait(10)
        statuses = [job.status for job in jobs]
        assert statuses[0] is JobStatus.Finished
        assert statuses.count(JobStatus.Cancelled) >= 17 and holder["count"] >= 17
        assert all(isinstance(job.exception, JobCancelledError) for job in jobs if job.status is JobStatus.Cancelled)
        assert node_load([node]) == [(0, 0)]
        assert cluster.submit(7)() == 49  # the cluster goes on after a stop


def test_only_if_drops_results_on_the_node(node):
    with clusterpy.JobCluster(square, nodes=[node.address], only_if=lambda r: r % 10 == 0) as cluster:
        assert list(cluster.map(range(40), chunksize=7)) == [0, 100, 400, 900]
        kept, dropped = cluster.submit(10), cluster.submit(3)
        assert kept() == 100 and dropped() is None
        assert dropped.status is JobStatus.Finished
        stats = cluster.stats()
    per_job = {j.job_id: j.bytes_received for j in stats.jobs}
    assert per_job[str(dropped.id)] <= per_job[str(kept.id)] + 40


def test_needle_example_runs(start_node, tmp_path):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    out = subprocess.run([sys.executable, str(REPO / "examples" / "needle.py"), *(n.address for n in nodes)],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "found 2719" in out.stdout and "stopped after" in out.stdout
