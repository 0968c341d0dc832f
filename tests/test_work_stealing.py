"""No head-of-line blocking: jobs prefetched behind a slow job on one node are recalled by an
idle node (work stealing), with real nodes and the shared scheduler."""

from __future__ import annotations

import time

import clusterpy
from clusterpy import JobStatus

from .conftest import wait_until
from .test_shared import start_scheduler  # noqa: F401 (fixture)


def nap(seconds):
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def _both_nodes_ready(cluster) -> bool:
    warm = [cluster.submit(0.5) for _ in range(2)]
    return len({job(10) for job in warm}) == 2  # they ran at once, one per node


def _fast_jobs_are_not_held_back(cluster, node_count: int) -> None:
    wait_until(lambda: _both_nodes_ready(cluster), timeout=15)
    began = time.monotonic()
    slow = cluster.submit(4.0)  # first on its node: the next job sent there waits behind it
    fast = [cluster.submit(0.2) for _ in range(2 * node_count - 1)]
    for job in fast:
        job(10)
    fast_done = time.monotonic() - began
    assert slow.status is JobStatus.Running
    assert fast_done < 2.5, f"fast jobs took {fast_done:.1f}s: one waited behind the 4 s job"
    assert all(job.status is JobStatus.Finished for job in fast)
    slow(20)


def test_an_idle_node_takes_the_jobs_waiting_behind_a_slow_one(start_node):
    nodes = [start_node(cpus=1) for _ in range(2)]
    with clusterpy.JobCluster(nap, nodes=[n.address for n in nodes]) as cluster:
        _fast_jobs_are_not_held_back(cluster, 2)


def test_without_stealing_a_job_waits_behind_the_slow_one(start_node):
    # The control: the test above fails when stealing is off.
    nodes = [start_node(cpus=1) for _ in range(2)]
    with clusterpy.JobCluster(nap, nodes=[n.address for n in nodes], work_stealing=False) as cluster:
        wait_until(lambda: len(cluster.nodes()) == 2)
        began = time.monotonic()
        cluster.submit(3.0)
        fast = [cluster.submit(0.2) for _ in range(3)]
        for job in fast:
            job(10)
        assert time.monotonic() - began > 2.5


def test_the_shared_scheduler_steals_too(start_node, start_scheduler):
    nodes = [start_node(cpus=1) for _ in range(2)]
    sched = start_scheduler(nodes)
    with clusterpy.SharedJobCluster(nap, sched.address) as cluster:
        _fast_jobs_are_not_held_back(cluster, 2)


def test_example_runs(start_node):
    import subprocess
    import sys

    from .conftest import REPO

    nodes = [start_node(cpus=1) for _ in range(2)]
    out = subprocess.run([sys.executable, str(REPO / "examples" / "work_stealing.py"), *(n.address for n in nodes)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "with work stealing" in out.stdout
