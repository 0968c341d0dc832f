"""cluster.map with chunks (ordered, lazy, failing items named) and dataflow between jobs."""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import subprocess
import sys
import threading
import time

import pytest

import clusterpy
from clusterpy import JobCancelledError, JobStatus, RemoteTraceback, UpstreamJobError
from clusterpy.dataflow import find_upstream, substitute

from .conftest import REPO


def square(x):
    return x * x


def add(*values, extra=0):
    return sum(values) + extra


def slow(value, seconds=0.3):
    import time

    time.sleep(seconds)
    return value


def divide(a, b):
    return a / b


@pytest.fixture(scope="module")
def cluster():
    with clusterpy.JobCluster(square, local=True, local_cpus=2) as c:
        yield c


@pytest.fixture(scope="module")
def ex(cluster):
    return cluster.executor()


# ---------------------------------------------------------------- map


def test_map_100k_items_in_chunks_of_1000_in_order(cluster):
    start = time.monotonic()
    results = list(cluster.map(range(100_000), chunksize=1000))
    elapsed = time.monotonic() - start
    assert results == [i * i for i in range(100_000)]
    assert elapsed < 20, elapsed  # 100 jobs, not 100,000


def test_map_several_iterables_and_no_chunks(ex):
    assert list(ex.map(add, range(10), range(10, 20))) == [a + b for a, b in zip(range(10), range(10, 20))]
    with clusterpy.JobCluster(add, local=True, local_cpus=1) as c:
        assert list(c.map([1, 2], [10, 20], [100, 200])) == [111, 222]
        assert list(c.map(range(7), range(7), chunksize=3)) == [2 * i for i in range(7)]


def test_map_failing_item_reports_index_and_value(cluster):
    items = [1, 2, 3, "four", 5, 6]
    got = []
    with pytest.raises(TypeError) as info:
        for value in cluster.map(items, chunksize=4):
            got.append(value)
    assert got == [1, 4, 9]  # the items before the failing one, from the same chunk
    assert info.value.clusterpy_map_index == 3
    assert any("item 3 of the map: 'four'" in note for note in info.value.__notes__)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "square" in str(info.value.__cause__)


def test_map_is_lazy_and_bounded(cluster):
    pulled = []

    def endless():
        for i in itertools.count():
            pulled.append(i)
            yield i

    results = cluster.map(endless(), chunksize=5, buffersize=2)
    assert list(itertools.islice(results, 12)) == [i * i for i in range(12)]
    assert len(pulled) <= 12 + 5 * 3
    results.close()


def test_map_timeout_and_bad_arguments(ex, cluster):
    with pytest.raises(TimeoutError):
        list(ex.map(slow, [1, 2], [0.0, 1.0], timeout=0.4))
    with pytest.raises(ValueError):
        cluster.map(range(3), chunksize=0)
    with pytest.raises(ValueError):
        cluster.map(range(3), buffersize=0)
    with pytest.raises(TypeError):
        cluster.map()


# ---------------------------------------------------------------- dataflow


def test_three_stage_dataflow(ex):
    a = ex.submit(square, 3)  # 9
    b = ex.submit(add, a, 1)  # 10
    c = ex.submit(add, b, [a][0], extra=b)  # 10 + 9 + 10
    assert c.result(30) == 29


def test_dataflow_with_cluster_jobs_nested_arguments_and_foreign_futures(cluster, ex):
    a = cluster.submit(4)  # ClusterJob: 16
    with cf.ThreadPoolExecutor(1) as pool:
        foreign = pool.submit(slow, 5, 0.2)  # a future from another executor
        job = ex.submit(lambda d, l, t: (d["x"] + l[0] + t[1][0], sorted(d)), {"x": a, "y": [a]}, [foreign], (0, [a]))
        assert job.result(30) == (16 + 5 + 16, ["x", "y"])
    # a job of the cluster's own computation can depend on an executor future too
    assert cluster.submit(ex.submit(add, 2, 3))() == 25


def test_failing_upstream_fails_dependents_with_its_cause(ex, cluster):
    a = ex.submit(divide, 1, 0)
    b = ex.submit(add, a, 1)
    c = cluster.submit(b)  # two levels down
    with pytest.raises(UpstreamJobError) as info:
        b.result(30)
    cause = info.value.__cause__
    assert isinstance(cause, ZeroDivisionError) and isinstance(cause.__cause__, RemoteTraceback)
    assert "ZeroDivisionError" in str(info.value)
    with pytest.raises(UpstreamJobError) as info_c:
        c(30)
    assert isinstance(info_c.value.__cause__, UpstreamJobError)
    assert c.status is JobStatus.Terminated


def test_cancelled_upstream_and_cancelled_dependent(ex, cluster):
    blockers = [ex.submit(slow, i, 0.5) for i in range(2)]
    queued = ex.submit(square, 2)
    dependent = ex.submit(add, queued, 1)
    assert queued.cancel()
    with pytest.raises(UpstreamJobError) as info:
        dependent.result(30)
    assert isinstance(info.value.__cause__, cf.CancelledError)
    # cancelling a job that waits for its upstream drops it; the upstream runs on
    upstream = ex.submit(slow, 5, 0.3)
    waiting = cluster.submit(upstream)  # square(5), once upstream is done
    assert waiting.cancel()
    with pytest.raises(JobCancelledError):
        waiting(30)
    assert waiting.status is JobStatus.Cancelled and upstream.result(30) == 5
    for b in blockers:
        b.result(30)


def test_pending_dependents_hold_no_thread_and_the_cluster_waits_for_them():
    with clusterpy.JobCluster(add, local=True, local_cpus=1) as c:
        gate = c.submit(0.0)
        threads = threading.active_count()
        upstream = c.executor().submit(slow, 1, 0.5)
        dependents = [c.submit(upstream, i) for i in range(200)]
        assert threading.active_count() == threads
        assert c.wait(30)  # counts the dependents as work to wait for
        assert all(d.done() for d in dependents)
        assert [d() for d in dependents] == [1 + i for i in range(200)]
        assert gate() == 0.0


def test_find_and_substitute_walk_containers():
    done = cf.Future()
    done.set_result(7)
    loop = [done]
    loop.append(loop)  # a list that holds itself
    args = ({"k": (done, {done})}, loop, frozenset([1]))
    found = find_upstream(args, {"x": done})
    assert [f for f, _ in found] == [done]
    new = substitute(args)
    assert new[0] == {"k": (7, {7})} and new[1][0] == 7 and new[1][1] is new[1]
    assert find_upstream((1, "a", [2, {3: 4}]), {}) == []


def test_unpicklable_arguments_still_fail_clearly(cluster):
    with pytest.raises(clusterpy.ClusterError, match="cannot be pickled"):
        cluster.submit(threading.Lock())


def test_map_dataflow_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "map_dataflow.py")], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "100000 results, last 9999800001" in out.stdout
    assert "c = 29" in out.stdout and "UpstreamJobError" in out.stdout
    assert "scattered" in out.stdout


def test_futures_among_chunked_map_items(ex):
    upstream = [ex.submit(square, i) for i in range(6)]
    assert list(ex.map(add, upstream, range(6), chunksize=4)) == [i * i + i for i in range(6)]
