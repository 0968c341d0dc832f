"""clusterpy.compat.dispy: dispy programs run unchanged but for the import, against real nodes.

The programs in tests/dispy_programs/ are written as dispy programs (dispy's names, constants
and idioms); each test runs one as a subprocess and checks what it prints. A few tests drive
the API in-process where a program could not observe the behaviour.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

import clusterpy.compat.dispy as dispy
from clusterpy.compat import dispy_shim_path
from clusterpy.compat._dispy_engine import engine_nodes
from clusterpy.compat._dispy_types import parse_node_allocs
from clusterpy.errors import ClusterClosedError, ConfigurationError

from .conftest import REPO, wait_until
from .test_shared import SchedulerProcess

PROGRAMS = REPO / "tests" / "dispy_programs"


def run(program: str, *args: str, cwd=None, env=None, timeout: float = 60) -> str:
    out = subprocess.run([sys.executable, str(PROGRAMS / program), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
    assert out.returncode == 0, f"{program} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    return out.stdout


# ---------------------------------------------------------------- programs against real nodes


def check_sample_output(out: str, two_nodes: bool) -> None:
    lines = re.findall(r"^(\S+) \((\S+)\) executed job (\d+): (\d+), status (\d+)$", out, re.M)
    assert [(int(n), int(sq)) for _h, _ip, n, sq, _s in lines] == [(i, i * i) for i in range(12)]
    assert {(host, ip, status) for host, ip, _n, _sq, status in lines} == {
        (socket.gethostname(), "127.0.0.1", str(dispy.DispyJob.Finished))}
    used = re.search(r"nodes used: \[(.*)\]", out)[1]
    counts = [int(c) for c in re.findall(r"/(\d+)'", used)]
    assert sum(counts) == 12 and (len(counts) == 2 if two_nodes else len(counts) == 1)
    assert all(counts), "every node ran jobs"
    assert "speedup" in out  # print_status


def test_sampling_loop_prints_node_names(start_node):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    check_sample_output(run("sample.py", *(n.address for n in nodes)), two_nodes=True)


def test_import_dispy_unchanged_through_the_opt_in_shim(node, tmp_path):
    source = (PROGRAMS / "sample.py").read_text()
    assert "    import clusterpy.compat.dispy as dispy\n" in source
    program = tmp_path / "sample_dispy.py"
    program.write_text(source.replace("    import clusterpy.compat.dispy as dispy\n", "    import dispy\n"))
    if importlib.util.find_spec("dispy") is None:  # not installed by default
        plain = subprocess.run([sys.executable, str(program), node.address], capture_output=True, text=True,
                               timeout=30)
        assert plain.returncode != 0 and "No module named 'dispy'" in plain.stderr
    shim = subprocess.run([sys.executable, "-m", "clusterpy.compat"], capture_output=True, text=True, check=True)
    assert shim.stdout.strip() == dispy_shim_path()
    out = subprocess.run([sys.executable, str(program), node.address], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": shim.stdout.strip()})
    assert out.returncode == 0, out.stderr
    check_sample_output(out.stdout, two_nodes=False)


def test_objects_of_a_user_class_as_arguments(node):
    out = run("user_class.py", node.address)
    for i in range(5):
        assert f": Point({3 * i}, {-3 * i}) is a Point" in out
    assert f"failed ({dispy.DispyJob.Terminated}): AttributeError: 'str' object has no attribute 'scaled'" in out


def test_bounded_submission_driven_by_job_status(node):
    out = run("bounded.py", node.address)
    total, most, now = map(int, re.search(r"total (\d+), most pending (\d+), pending now (\d+)", out).groups())
    assert total == sum(i * i for i in range(40))
    assert most <= 6 and now == 0


def test_provisional_results_with_cancellation_and_files(node, tmp_path):
    out = run("provisional.py", node.address, cwd=tmp_path)
    for i in range(2):
        assert f"search-{i}: status {dispy.DispyJob.Cancelled}, provisional results [0, 1, 2, 3, 4, 5]" in out
    assert "sender: sent ['report of 7 steps']" in out
    assert (tmp_path / "sender" / "report-7.txt").is_file()  # files_dir/<job id>/<name>


def test_per_node_setup_data_with_node_allocate(start_node, tmp_path):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("alpha\n")
    (data / "b.txt").write_text("beta\n")
    out = run("node_setup.py", str(data), *(n.address for n in nodes))
    given = re.findall(r"^node 127\.0\.0\.1 \((\S+), 2 CPUs, Linux\) gets (\w\.txt)$", out, re.M)
    assert sorted(given) == [(socket.gethostname(), "a.txt"), (socket.gethostname(), "b.txt")]
    ran = re.findall(r"^job (\d) ran with (\w\.txt): (\w+)$", out, re.M)
    assert len(ran) == 8 and all({"a.txt": "alpha", "b.txt": "beta"}[f] == d for _j, f, d in ran)
    assert {f for _j, f, _d in ran} == {"a.txt", "b.txt"}  # one job at a time per node: both ran jobs
    assert "cpus per node: [1, 1]" in out


def test_cluster_status_callback(start_node):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    out = run("cluster_status.py", *(n.address for n in nodes)).splitlines()
    addresses = {n.address for n in nodes}
    assert {line.split()[1] for line in out[:2]} == addresses and all(line.endswith("Initialized") for line in out[:2])
    assert {line.split()[1] for line in out[-3:-1]} == addresses and all(line.endswith("Closed") for line in out[-3:-1])
    events = [line.split() for line in out if line.startswith("job ")]
    for i in range(5):
        mine = [(e[2], e[4]) for e in events if e[1] == f"j{i}"]
        end = "Terminated" if i == 3 else "Finished"
        assert [s for s, _ in mine] == ["Created", "Running", end], mine
        assert mine[0][1] == "-" and mine[1][1] == mine[2][1] and mine[1][1] in addresses
    assert out[-1] == "results [100, 101, 102, None, 104]"


def test_node_management(start_node):
    nodes = [start_node(cpus=2), start_node(cpus=2)]
    out = run("manage_nodes.py", *(n.address for n in nodes))
    assert out.splitlines() == [
        "first node: 2 CPUs of 2",
        "set_node_cpus -> 1",
        "jobs on first node: 1",
        "deallocate_node -> 0",
        "allocate second node -> 0",
        "while deallocated, jobs on first node: 0",
        "allocate first node again -> 0",
        "given back, jobs on first node: True",
        "submit to unknown node -> None",
        "close_node -> 0",
        "nodes left: True",
        "set_node_cpus of a closed node -> -1",
        f"pinned jobs: {[dispy.DispyJob.Finished] * 3}",
    ]


def test_recover_jobs_after_the_client_died(node, tmp_path):
    journal = str(tmp_path / "recover.journal")
    crash = subprocess.run([sys.executable, str(PROGRAMS / "recover.py"), "crash", journal, node.address],
                           capture_output=True, text=True, timeout=60)
    assert crash.returncode == 3 and "the client dies now" in crash.stdout, crash.stderr
    out = run("recover.py", "recover", journal)
    # Two ran (the node has 2 CPUs); the third was never sent: it comes back Created.
    assert out.splitlines() == [f"job-0: {dispy.DispyJob.Finished} 0", f"job-1: {dispy.DispyJob.Finished} 10",
                                f"job-2: {dispy.DispyJob.Created} None"]


def test_shared_job_cluster(node, tmp_path):
    scheduler = SchedulerProcess(tmp_path, [node])
    try:
        out = run("shared.py", scheduler.address)
    finally:
        scheduler.stop()
    assert f"results {[2 * i for i in range(10)]}" in out
    assert f"job_status saw {[2 * i for i in range(10)]}" in out
    assert f"node names ['{socket.gethostname()}']" in out


def test_example_runs_against_a_node(node):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "dispy_program.py"), node.address],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "job 9: 81 computed on" in out.stdout and "speedup" in out.stdout


# ---------------------------------------------------------------- in-process


def square(x):
    return x * x


def test_allocate_decides_per_node_and_discover_nodes_adds_nodes(start_node):
    used, other = start_node(cpus=2), start_node(cpus=2)
    seen: list[tuple] = []

    class Deciding(dispy.NodeAllocate):
        def allocate(self, cluster, ip_addr, name, cpus, avail_info=None, platform=""):
            seen.append((cluster, ip_addr, name, cpus, avail_info, platform))
            return {1: 1, 2: 0}.get(len(seen), cpus)  # the first node: 1 CPU; the next: refused, then all

    cluster = dispy.JobCluster(square, nodes=[Deciding(used.host, used.port)])
    try:
        wait_until(lambda: cluster.status().nodes)
        assert cluster.discover_nodes(other.address) == 0
        wait_until(lambda: len(seen) == 2)
        time.sleep(0.2)
        assert [n.port for n in cluster.status().nodes] == [used.port]  # refused: not used
        jobs = [cluster.submit(i) for i in range(6)]
        assert [job() for job in jobs] == [i * i for i in range(6)]
        [node] = cluster.status().nodes  # counted before job() returned, as dispy did
        assert (node.port, node.cpus, node.avail_cpus, node.busy, node.jobs_done) == (used.port, 1, 2, 0, 6)
        assert cluster.status().jobs_pending == 0
        assert {s[1:] for s in seen} == {("127.0.0.1", socket.gethostname(), 2, None, "Linux")}
        assert all(s[0] is cluster for s in seen)
        assert cluster.discover_nodes([other.address]) == 0  # looked for again: accepted this time
        wait_until(lambda: len(cluster.status().nodes) == 2)
        assert sorted((n.port, n.cpus) for n in cluster.status().nodes) == sorted([(used.port, 1), (other.port, 2)])
    finally:
        assert cluster.close() is True


def test_close_with_a_timeout_returns_false_and_keeps_the_cluster(node):
    cluster = dispy.JobCluster(time.sleep, nodes=[node.address])
    try:
        job = cluster.submit(1.0)
        assert cluster.close(timeout=0.1) is False
        assert cluster.submit(0) is not None  # still open
    finally:
        assert cluster.close(terminate=True) is True
    assert job.status in (dispy.DispyJob.Cancelled, dispy.DispyJob.Finished)


@pytest.mark.parametrize("kwargs, name", [
    (dict(ipv4_udp_multicast=True), "ipv4_udp_multicast"),
    (dict(dest_path="a/b"), "dest_path"),
    (dict(setup=print, computation="/bin/true"), "setup"),
])
def test_keywords_clusterpy_cannot_honour_raise_naming_them(kwargs, name):
    computation = kwargs.pop("computation", square)
    with pytest.raises(ConfigurationError, match=name):
        dispy.JobCluster(computation, nodes=["127.0.0.1:9"], **kwargs)


def test_shared_cluster_keywords_and_unknown_keywords():
    with pytest.raises(ConfigurationError, match='"nodes"'):
        dispy.SharedJobCluster(square, nodes=["10.0.0.1"], scheduler_host="127.0.0.1:9")
    with pytest.raises(ConfigurationError, match='"exclusive"'):
        dispy.SharedJobCluster(square, scheduler_host="127.0.0.1:9", exclusive=True)
    with pytest.raises(TypeError, match="no_such_option"):
        dispy.JobCluster(square, no_such_option=1)
    with pytest.raises(ConfigurationError, match="recover_file"):
        dispy.recover_jobs()
    with pytest.raises(ConfigurationError, match="terminate_pending"):
        dispy.recover_jobs("somewhere", terminate_pending=True)


def test_unneeded_keywords_are_accepted_with_a_warning_and_unsupported_calls_raise():
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("dispy").addHandler(handler)
    try:
        cluster = dispy.JobCluster(square, nodes=["127.0.0.1:9"], ext_host="203.0.113.1", poll_interval=10)
    finally:
        logging.getLogger("dispy").removeHandler(handler)
    try:
        warned = " ".join(r.getMessage() for r in records)
        assert '"ext_host" is not needed' in warned and '"poll_interval" is not needed' in warned
        for call, name in ((lambda: cluster.resetup_node("127.0.0.1"), "resetup_node"),
                           (lambda: cluster.send_file(__file__, "127.0.0.1"), "send_file"),
                           (lambda: cluster.submit(1, dispy_job_depends=[__file__]), "dispy_job_depends")):
            with pytest.raises(ConfigurationError, match=name):
                call()
        assert cluster.submit_node("192.0.2.7", 1) is None
        assert cluster.cancel(object()) == -1
    finally:
        assert cluster.close(terminate=True) is True
    with pytest.raises(ClusterClosedError):
        cluster.submit(1)


def test_names_and_constants_match_dispy():
    assert (dispy.DispyJob.Created, dispy.DispyJob.Running, dispy.DispyJob.ProvisionalResult, dispy.DispyJob.Cancelled,
            dispy.DispyJob.Terminated, dispy.DispyJob.Abandoned, dispy.DispyJob.Finished) == (5, 6, 7, 8, 9, 10, 11)
    assert (dispy.DispyNode.Initialized, dispy.DispyNode.Closed, dispy.DispyNode.AvailInfo) == (4, 16, 17)
    assert set(dispy.__all__) >= {"logger", "DispyJob", "DispyNode", "NodeAllocate", "JobCluster", "SharedJobCluster",
                                  "recover_jobs"}
    assert dispy.logger.DEBUG == logging.DEBUG and callable(dispy.logger.show_ms)
    assert dispy.JobCluster.stats is dispy.JobCluster.print_status


def test_node_allocate_forms_and_default_allocation(tmp_path):
    f = tmp_path / "x.dat"
    f.write_text("x")
    allocs = parse_node_allocs(
        ["localhost", ("127.0.0.1", 9800, 2), {"host": "10.0.*", "cpus": -1, "setup_args": (1,), "depends": [str(f)]},
         "127.0.0.1:9801", dispy.NodeAllocate("*")])
    assert [(a.ip_addr, a.port, a.cpus) for a in allocs] == [
        ("127.0.0.1", None, 0), ("127.0.0.1", 9800, 2), ("10.0.*", None, -1), ("127.0.0.1", 9801, 0), ("*", None, 0)]
    assert allocs[2].setup_args == (1,) and allocs[2].depends == [str(f)]
    assert allocs[1].allocate(None, "127.0.0.1", "n", 8) == 2
    assert allocs[2].allocate(None, "10.0.3.4", "n", 8) == 7 and allocs[2].allocate(None, "10.1.3.4", "n", 8) == 0
    assert allocs[4].allocate(None, "192.168.0.9", "n", 4) == 4
    with pytest.raises(ConfigurationError, match="setup_args"):
        dispy.NodeAllocate("*", setup_args=[1])
    with pytest.raises(ConfigurationError, match="not a file"):
        dispy.NodeAllocate("*", depends=[str(tmp_path / "missing")])
    assert engine_nodes(allocs, 9700) == ["127.0.0.1:9700", "127.0.0.1:9800", "10.0.*", "127.0.0.1:9801", "*"]
    assert engine_nodes([dispy.NodeAllocate("*")], 9700) is None


def test_job_status_sees_every_provisional_result_in_order(node):
    seen: list[tuple[int, object]] = []
    done = threading.Event()

    def progress(n):
        for i in range(n):
            dispy_provisional_result(i)  # noqa: F821 -- a global on the node
        return "end"

    def job_status(job):
        seen.append((job.status, job.result))
        if job.status == dispy.DispyJob.Finished:
            done.set()

    cluster = dispy.JobCluster(progress, nodes=[node.address], job_status=job_status)
    try:
        job = cluster.submit(20)
        assert job() == "end" and job.finish.is_set()
        assert done.wait(10)
    finally:
        cluster.close()
    assert seen == [(dispy.DispyJob.ProvisionalResult, i) for i in range(20)] + [(dispy.DispyJob.Finished, "end")]


def test_setup_and_cleanup_get_the_nodes_setup_args(node, tmp_path):
    log = tmp_path / "cleanup.log"

    def setup(path, word):
        global WORD
        WORD = word
        return 0

    def cleanup(path, word):
        with open(path, "a") as f:
            f.write(f"{word} {dispy_node_name}\n")  # noqa: F821 -- a global on the node

    def compute():
        import os

        return WORD, dispy_job_path == os.getcwd()  # noqa: F821 -- globals on the node

    alloc = dispy.NodeAllocate(node.host, node.port, setup_args=(str(log), "hello"))
    cluster = dispy.JobCluster(compute, nodes=[alloc], setup=setup, cleanup=cleanup)
    try:
        assert [cluster.submit()() for _ in range(3)] == [("hello", True)] * 3
    finally:
        cluster.close()
    # cleanup ran in each worker process that loaded the computation (one per CPU at most)
    lines = wait_until(lambda: log.exists() and log.read_text().splitlines())
    assert set(lines) == {f"hello {socket.gethostname()}"} and 1 <= len(lines) <= node.cpus


def test_a_program_as_the_computation(node, tmp_path):
    program = tmp_path / "greet.sh"
    program.write_text('#!/bin/sh\necho "args: $*"\nexit "$2"\n')
    program.chmod(0o755)
    cluster = dispy.JobCluster(str(program), nodes=[(node.host, node.port)])
    try:
        ok, failed = cluster.submit("a", 0), cluster.submit("b", 3)
        assert (ok(), ok.stdout, ok.status) == (0, "args: a 0\n", dispy.DispyJob.Finished)
        assert (failed(), failed.stdout) == (3, "args: b 3\n")
    finally:
        cluster.close()
