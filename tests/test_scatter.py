"""Scatter: a large object reaches each node once, however many jobs use it.

Bytes are counted twice, independently: by the client (object bytes it streamed to each node)
and by the kernel: ``wchar`` in /proc/<pid>/io of each real node process counts every byte the
node wrote with write(), i.e. into its file store and into the pipes that carry each job's
arguments to its workers (socket sends are not counted). An object shipped with each job would
cross those pipes once per job.
"""

from __future__ import annotations

import os
import socket

import pytest

import clusterpy
from clusterpy.scatter import Scattered

from .conftest import wait_until

SIZE = 50 * 1024 * 1024


def use(blob, i):
    """A job that needs the scattered object: its length, a byte of it, and who ran it."""
    import os

    return len(blob), blob[i], os.getpid()


def identity_of(obj):
    import clusterpy._remote as r

    return id(obj), r.cache_info()["scatter_loads"]


def wchar(pid: int) -> int:
    with open(f"/proc/{pid}/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_50mb_object_used_by_100_jobs_goes_once_to_each_node(start_node):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    late_port = free_port()  # a third node, started after the scatter
    blob = os.urandom(SIZE)
    with clusterpy.JobCluster(use, nodes=[n.address for n in nodes] + [f"127.0.0.1:{late_port}"],
                              pulse_interval=0.3) as cluster:
        ex = cluster.executor()
        while len(cluster.nodes()) < 2:
            cluster.submit(b"x", 0)()
        before = {n.address: wchar(n.proc.pid) for n in nodes}
        handle = cluster.scatter(blob)
        assert isinstance(handle, Scattered) and handle.size > SIZE
        jobs = [cluster.submit(handle, i) for i in range(100)]
        results = [job(60) for job in jobs]
        assert [r[:2] for r in results] == [(SIZE, blob[i]) for i in range(100)]
        assert {job.node_id for job in jobs} == {n.node_id for n in nodes}  # both nodes used it

        sent = cluster._rt.scatter.bytes_sent
        assert sorted(sent) == sorted(n.address for n in nodes)
        assert all(v == handle.size for v in sent.values()), sent  # once per node, not per job
        for n in nodes:
            written = wchar(n.proc.pid) - before[n.address]
            # Stored once; shipping it with its jobs would write ~50 MB per job into the pipes.
            assert handle.size <= written < 2 * handle.size, (n.address, written)

        # Each worker unpickles it once and hands every later job the same object.
        loads = {}
        for pid_and_count in ex.map(identity_of, [handle] * 40):
            loads.setdefault(pid_and_count[0], set()).add(pid_and_count[1])
        assert all(len(counts) == 1 for counts in loads.values())

        # Scattering the same object again sends nothing.
        assert cluster.scatter(blob) == handle
        assert all(v == handle.size for v in cluster._rt.scatter.bytes_sent.values())

        # A node that joins later gets the object before its first job.
        late = start_node(cpus=1, extra=["--port", str(late_port)])
        wait_until(lambda: any(n["name"] == late.address and n["connected"] for n in cluster.nodes()), timeout=20)
        job = cluster.submit_node(late.address, handle, 7)  # sent as soon as it joined
        assert job(60)[:2] == (SIZE, blob[7])
        assert job.node_id == late.node_id
        assert cluster._rt.scatter.bytes_sent[late.address] == handle.size


def test_scatter_small_objects_in_containers_and_async(node):
    import asyncio

    with clusterpy.JobCluster(use, nodes=[node.address]) as cluster:
        ex = cluster.executor()
        table = cluster.broadcast({"a": 1, "b": 2})
        assert ex.submit(lambda t, k: t[k], table, "b").result(30) == 2
        assert ex.submit(lambda ts: [t["a"] for t in ts], [table, table]).result(30) == [1, 1]

        async def scatter_later():
            return await cluster.scatter_async(list(range(1000)))

        numbers = asyncio.run(scatter_later())
        assert ex.submit(sum, numbers).result(30) == sum(range(1000))
        assert cluster.scatter(numbers) is numbers


def test_handle_outside_a_job_and_failures(node):
    from clusterpy._remote import load_scattered

    with clusterpy.JobCluster(use, nodes=[node.address]) as cluster:
        handle = cluster.scatter(b"abc")
    with pytest.raises(LookupError, match="can be used only in jobs"):
        load_scattered(handle.sha256)
    with pytest.raises(clusterpy.ClusterClosedError):
        cluster.scatter(b"more")


def test_node_refusing_the_object_fails_scatter_not_the_cluster(start_node):
    small = start_node(cpus=1, extra=["--max-file-size", "1000"])
    with clusterpy.JobCluster(use, nodes=[small.address]) as cluster:
        wait_until(lambda: cluster.nodes(), timeout=20)  # scatter waits only for connected nodes
        with pytest.raises(clusterpy.ClusterError, match="could not store"):
            cluster.scatter(os.urandom(5000))
        assert cluster.submit(b"ok", 0)()[:2] == (2, ord("o"))  # the computation goes on
        handle = cluster.scatter(b"tiny")
        assert cluster.submit(handle, 0)()[:2] == (4, ord("t"))
