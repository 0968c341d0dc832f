"""JobCluster against real clusterpy-node processes over real sockets on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy.errors import (
    ClusterClosedError,
    ConfigurationError,
    JobCancelledError,
    JobTerminatedError,
    NodeLostError,
    RemoteTraceback,
    WorkerDiedError,
)

from .conftest import REPO, wait_until


def compute(n):
    import sys
    import time

    print(f"out {n}")
    print(f"err {n}", file=sys.stderr)
    time.sleep(0.01)
    return n * n


def failing(n):
    def inner_helper(x):
        return 1 / x

    return inner_helper(n)


def test_results_output_and_timing(node):
    before = time.time()
    with clusterpy.JobCluster(compute, nodes=[node.address]) as cluster:
        jobs = [cluster.submit(i) for i in range(20)]
        results = [job() for job in jobs]
        assert results == [i * i for i in range(20)]
        for i, job in enumerate(jobs):
            assert job.status is JobStatus.Finished
            assert job.stdout == f"out {i}\n" and job.stderr == f"err {i}\n"
            assert job.ip_addr == "127.0.0.1" and job.node_id == node.node_id
            assert before <= job.start_time <= job.end_time <= time.time()
            assert job.end_time - job.start_time >= 0.009
        stats = cluster.stats()
        assert stats["jobs_done"] == 20 and stats["nodes"][0]["cpus"] == 2


def test_remote_exception_reraised_with_remote_traceback(node):
    with clusterpy.JobCluster(failing, nodes=[node.address]) as cluster:
        job = cluster.submit(0)
        with pytest.raises(ZeroDivisionError) as info:
            job()
        assert job.status is JobStatus.Terminated
        assert isinstance(job.exception, ZeroDivisionError)
        cause = info.value.__cause__
        assert isinstance(cause, RemoteTraceback)
        assert "inner_helper" in str(cause) and node.address in str(cause)
        assert "return 1 / x" in str(cause) and __file__ in str(cause)  # source lines, whatever cloudpickle does
        assert cluster.submit(2)() == 0.5


def test_closures_lambdas_and_classes_travel(node):
    factor = 7

    class Acc:
        def __init__(self, v):
            self.v = v

    with clusterpy.JobCluster(lambda x: Acc(x * factor), nodes=[node.address]) as cluster:
        result = cluster.submit(6)()
        assert type(result).__name__ == "Acc" and result.v == 42


def test_module_only_on_client_is_importable(node, tmp_path, monkeypatch):
    moddir = tmp_path / "clientmods"
    moddir.mkdir()
    (moddir / "clientonly_helper.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(moddir))
    import clientonly_helper

    def use_module(x):
        import clientonly_helper as h

        return h.triple(x)

    with clusterpy.JobCluster(use_module, nodes=[node.address], depends=[clientonly_helper]) as cluster:
        assert cluster.submit(5)() == 15
    sys.modules.pop("clientonly_helper", None)


def test_file_dependency_reaches_working_directory(node, tmp_path):
    data = tmp_path / "numbers.txt"
    data.write_text("1 2 3 4\n")

    def total(name):
        import os

        with open(name) as f:
            return sum(map(int, f.read().split())), os.getcwd()

    with clusterpy.JobCluster(total, nodes=[node.address], depends=[str(data)]) as cluster:
        value, cwd = cluster.submit("numbers.txt")()
        assert value == 10
        assert cwd.startswith(str(node.dest))
    # The computation's directory is removed when the client closes.
    wait_until(lambda: not os.path.exists(cwd))


def test_setup_globals_depends_and_cleanup(node, tmp_path):
    marker = tmp_path / "cleanup-ran"

    def helper(x):
        return x + 1000

    def setup(base):
        global OFFSET
        OFFSET = base
        return 0

    def cleanup():
        open(str(marker), "a").write("x")

    def uses_setup(x):
        return helper(x) + OFFSET  # noqa: F821 - defined by setup on the node

    with clusterpy.JobCluster(uses_setup, nodes=[node.address], depends=[helper], setup=setup,
                              setup_args=(5,), cleanup=cleanup) as cluster:
        assert [cluster.submit(i)() for i in range(4)] == [1005 + i for i in range(4)]
    wait_until(lambda: marker.exists())


def test_program_exit_codes_and_output(node, tmp_path):
    prog = tmp_path / "prog.sh"
    prog.write_text('#!/bin/sh\necho "args: $*"\necho oops >&2\nexit "$1"\n')
    prog.chmod(0o755)
    with clusterpy.JobCluster(str(prog), nodes=[node.address]) as cluster:
        ok, bad = cluster.submit(0, "a b"), cluster.submit(3, "c")
        assert ok() == 0 and ok.stdout == "args: 0 a b\n" and ok.stderr == "oops\n"
        assert bad() == 3 and bad.exit_code == 3 and bad.status is JobStatus.Finished


def test_worker_killed_mid_job_fails_only_that_job(node):
    def maybe_die(x):
        import os
        import signal

        if x == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        if x == "exit":
            os._exit(7)
        return x

    with clusterpy.JobCluster(maybe_die, nodes=[node.address]) as cluster:
        killed = cluster.submit("die")
        with pytest.raises(WorkerDiedError) as info:
            killed()
        assert info.value.exitcode == -9 and "SIGKILL" in str(info.value)
        exited = cluster.submit("exit")
        with pytest.raises(WorkerDiedError, match="exit code 7"):
            exited()
        assert [cluster.submit(i)() for i in range(6)] == list(range(6))
    assert node.alive()


def test_timeout_terminates_job_and_node_goes_on(node):
    with clusterpy.JobCluster(time.sleep, nodes=[node.address]) as cluster:
        slow = cluster.submit_job((30,), timeout=0.5)
        with pytest.raises(JobTerminatedError, match="timeout"):
            slow(20)
        assert slow.status is JobStatus.Terminated
        assert cluster.submit(0)() is None


def test_cancel_queued_and_running_jobs(node):
    with clusterpy.JobCluster(time.sleep, nodes=[node.address], prefetch=0) as cluster:
        running = [cluster.submit(30) for _ in range(2)]
        queued = cluster.submit(30)
        wait_until(lambda: all(j.status is JobStatus.Running for j in running))
        for job in (*running, queued):
            assert job.cancel()
        for job in (*running, queued):
            with pytest.raises(JobCancelledError):
                job(10)
            assert job.status is JobStatus.Cancelled
        assert cluster.submit(0)() is None


def test_callback_submit_node_and_closed_cluster(start_node):
    a, b = start_node(cpus=1), start_node(cpus=1)
    seen = []
    cluster = clusterpy.JobCluster(compute, nodes=[a.address, b.address], callback=seen.append)
    try:
        wait_until(lambda: len(cluster.nodes()) == 2)
        pinned = [cluster.submit_node(b.address, i) for i in range(5)]
        assert [j() for j in pinned] == [i * i for i in range(5)]
        assert {j.node_id for j in pinned} == {b.node_id}
        unknown = cluster.submit_node("10.255.255.1:1", 1)
        with pytest.raises(NodeLostError):
            unknown(5)
        assert unknown.status is JobStatus.Abandoned
        cluster.wait()
    finally:
        cluster.close()
    wait_until(lambda: len(seen) == 6)
    with pytest.raises(ClusterClosedError):
        cluster.submit(1)


def test_jobs_spread_over_nodes(start_node):
    a, b = start_node(cpus=2), start_node(cpus=2)
    with clusterpy.JobCluster(time.sleep, nodes=[a.address, b.address]) as cluster:
        wait_until(lambda: len(cluster.nodes()) == 2)
        jobs = [cluster.submit(0.2) for _ in range(8)]
        start = time.monotonic()
        for job in jobs:
            job()
        elapsed = time.monotonic() - start
        assert {j.node_id for j in jobs} == {a.node_id, b.node_id}
        assert elapsed < 0.8  # 8 x 0.2 s on 4 CPUs is 0.4 s


def test_wrong_secret_is_refused_and_node_keeps_serving(node):
    with clusterpy.JobCluster(compute, nodes=[node.address], secret="x" * 32) as cluster:
        job = cluster.submit(1)
        with pytest.raises(ConfigurationError, match="wrong secret"):
            job(10)
        assert job.status is JobStatus.Abandoned
    assert "refused" in node.log()
    with clusterpy.JobCluster(compute, nodes=[node.address]) as cluster:
        assert cluster.submit(3)() == 9


async def test_asyncio_interface(node):
    async with clusterpy.JobCluster(compute, nodes=[node.address]) as cluster:
        jobs = [await cluster.submit_async(i) for i in range(5)]
        assert await asyncio.gather(*jobs) == [i * i for i in range(5)]


def test_embedded_local_node():
    with clusterpy.JobCluster(compute, local=True, local_cpus=2) as cluster:
        assert cluster.submit(4)() == 16
        (info,) = cluster.nodes()
        assert info["ip_addr"] == "127.0.0.1" and info["cpus"] == 2


@pytest.mark.parametrize("example", ["sample.py", "program.py"])
def test_examples_run_on_a_local_node(example):
    out = subprocess.run([sys.executable, str(REPO / "examples" / example)], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    if example == "sample.py":
        assert out.stdout.count("slept") >= 10 and "Total: 10 of 10 jobs done" in out.stdout
    else:
        assert "alpha exit=0" in out.stdout.replace("  ", " ") or "alpha" in out.stdout
        assert "3 of 4 words found" in out.stdout


@pytest.mark.parametrize("example", ["sample.py", "program.py"])
def test_examples_run_against_a_node(node, example):
    out = subprocess.run([sys.executable, str(REPO / "examples" / example), node.address],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "job" in node.log() or "computation" in node.log()


def test_node_cli_help_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "clusterpy.node", "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "--secret-file" in out.stdout and "--cpus" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "clusterpy.node", "--cpus", "x"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
