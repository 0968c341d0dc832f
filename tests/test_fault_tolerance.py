"""Node loss, reentrant resubmission, poison jobs, restarts, and client crash recovery,
with real processes killed by signals on loopback."""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy.errors import NodeLostError, WorkerDiedError
from clusterpy.journal import JournalError, JournalWriter, read_journal

from .conftest import REPO, SECRET, NodeProcess, wait_until


def slow_square(x):
    import time

    time.sleep(0.03)
    return x * x


def _count_calls(jobs_seen, lock):
    def callback(job):
        with lock:
            jobs_seen[job.id] += 1
    return callback


def test_reentrant_jobs_survive_a_killed_node(start_node):
    nodes = [start_node(cpus=2) for _ in range(3)]
    seen, lock = collections.Counter(), threading.Lock()
    with clusterpy.JobCluster(slow_square, nodes=[n.address for n in nodes], reentrant=True,
                              callback=_count_calls(seen, lock), pulse_interval=0.2) as cluster:
        wait_until(lambda: len(cluster.nodes()) == 3)
        jobs = [cluster.submit(i) for i in range(200)]
        wait_until(lambda: sum(j.done() for j in jobs) >= 40)
        victim = nodes[1]
        victim.stop(signal.SIGKILL)
        results = [job(60) for job in jobs]
        assert results == [i * i for i in range(200)]
        assert all(job.status is JobStatus.Finished for job in jobs)
        assert any(job.node_id == victim.node_id for job in jobs)  # it did work before dying
    assert sorted(seen) == sorted(job.id for job in jobs) and set(seen.values()) == {1}


def test_without_reentrant_the_killed_nodes_jobs_are_abandoned(start_node):
    a, b = start_node(cpus=1), start_node(cpus=1)

    def sleeper(x):
        import time

        time.sleep(x)
        return x

    with clusterpy.JobCluster(sleeper, nodes=[a.address, b.address], pulse_interval=0.2) as cluster:
        wait_until(lambda: len(cluster.nodes()) == 2)
        jobs = [cluster.submit(1.5) for _ in range(4)]
        wait_until(lambda: sum(j.status is JobStatus.Running for j in jobs) == 2)
        on_a = [j for j in jobs if j.status is JobStatus.Running and j.ip_addr and
                cluster._call(lambda j=j: cluster._rt.core.node_of(j._key)) == a.node_id]
        a.stop(signal.SIGKILL)
        for job in jobs:
            try:
                job(30)
            except NodeLostError:
                pass
        abandoned = [j for j in jobs if j.status is JobStatus.Abandoned]
        finished = [j for j in jobs if j.status is JobStatus.Finished]
        assert on_a and set(map(id, on_a)) <= set(map(id, abandoned))
        assert len(abandoned) + len(finished) == 4 and finished
        assert all(isinstance(j.exception, NodeLostError) and "lost" in str(j.exception) for j in abandoned)
        assert all(j.node_id == b.node_id for j in finished)


def test_stopped_node_is_declared_lost_and_its_late_results_are_discarded(start_node):
    a, b = start_node(cpus=1), start_node(cpus=1)
    seen, lock = collections.Counter(), threading.Lock()

    def sleeper(x):
        import time

        time.sleep(x)
        return x

    with clusterpy.JobCluster(sleeper, nodes=[a.address, b.address], reentrant=True, pulse_interval=0.2,
                              node_timeout=1.0, prefetch=0, callback=_count_calls(seen, lock)) as cluster:
        wait_until(lambda: len(cluster.nodes()) == 2)
        jobs = [cluster.submit(0.8) for _ in range(2)]
        wait_until(lambda: all(j.status is JobStatus.Running for j in jobs))
        a.proc.send_signal(signal.SIGSTOP)  # a "partition": the node stops answering
        try:
            assert [job(30) for job in jobs] == [0.8, 0.8]
            assert {j.node_id for j in jobs} == {b.node_id}
        finally:
            a.proc.send_signal(signal.SIGCONT)
        # The node comes back: it rejoins, its stale results are discarded, and it runs new jobs.
        wait_until(lambda: sum(n["connected"] for n in cluster.nodes()) == 2, timeout=15)
        more = [cluster.submit(0.05) for _ in range(6)]
        assert [j(30) for j in more] == [0.05] * 6
    assert set(seen.values()) == {1} and len(seen) == 8


def test_poison_job_fails_after_allowed_failures(start_node, tmp_path):
    node = start_node(cpus=2)
    tries = tmp_path / "tries"

    def poison(path):
        with open(path, "a") as f:
            f.write("x")
        import os

        os._exit(13)

    with clusterpy.JobCluster(poison, nodes=[node.address], reentrant=True, allowed_failures=3) as cluster:
        job = cluster.submit(str(tries))
        with pytest.raises(WorkerDiedError, match="exit code 13"):
            job(60)
        assert job.status is JobStatus.Terminated
    assert tries.read_text() == "xxx"
    assert node.alive()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_restarted_at_the_same_address_rejoins(tmp_path):
    port = _free_port()
    first = NodeProcess(tmp_path, 1, ["--port", str(port)])
    try:
        with clusterpy.JobCluster(slow_square, nodes=[f"127.0.0.1:{port}"], pulse_interval=0.2) as cluster:
            assert cluster.submit(3)() == 9
            first.stop(signal.SIGKILL)
            wait_until(lambda: not any(n["connected"] for n in cluster.nodes()))
            second = NodeProcess(tmp_path, 1, ["--port", str(port)])
            try:
                job = cluster.submit(4)
                assert job(30) == 16
                assert job.node_id == second.node_id != first.node_id
            finally:
                second.stop()
    finally:
        first.stop()


CRASHING_CLIENT = textwrap.dedent("""
    import os, signal, sys, time
    import clusterpy

    def work(x):
        import time
        time.sleep(0.05 if x < 10 else 0.6)
        return x * 10

    cluster = clusterpy.JobCluster(work, nodes=[sys.argv[1]], recover_file=sys.argv[2])
    jobs = [cluster.submit(i) for i in range(20)]
    for job in jobs[:5]:
        job()
    print("five done", flush=True)
    time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_client_killed_mid_run_recovers_from_its_journal(node, tmp_path):
    journal = tmp_path / "journal.pkl"
    script = tmp_path / "client.py"
    script.write_text(CRASHING_CLIENT)
    out = subprocess.run([sys.executable, str(script), node.address, str(journal)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr
    assert "five done" in out.stdout
    assert os.stat(journal).st_mode & 0o777 == 0o600
    # A crash mid-write leaves a torn last record: recovery must tolerate it.
    data = journal.read_bytes()
    journal.write_bytes(data + data[-50:-7])
    jobs = clusterpy.recover_jobs(journal, timeout=60)
    assert [j.args[0] for j in jobs] == list(range(20))
    finished = [j for j in jobs if j.status is JobStatus.Finished]
    never_sent = [j for j in jobs if j.status is JobStatus.Created]
    assert len(finished) + len(never_sent) == 20
    assert len(finished) >= 7  # five were seen by the client; the ones in flight ended on the node
    assert all(j() == j.args[0] * 10 and j.node_id == node.node_id for j in finished)
    # Jobs the dead client never sent are returned so that they can be resubmitted.
    with clusterpy.JobCluster(lambda x: x * 10, nodes=[node.address]) as cluster:
        again = [cluster.submit(*j.args) for j in never_sent]
        assert [j() for j in again] == [j.args[0] * 10 for j in never_sent]
    # The node released the computation once everything was collected.
    wait_until(lambda: not [p for p in node.dest.iterdir() if p.name.startswith("c")])


def test_recover_without_waiting_returns_running_jobs_then_collects_them_later(node, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CRASHING_CLIENT.replace("0.6", "2.0"))
    journal = tmp_path / "journal2.pkl"
    out = subprocess.run([sys.executable, str(script), node.address, str(journal)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == -signal.SIGKILL, out.stderr
    early = clusterpy.recover_jobs(journal, wait=False)
    assert all(j.status is JobStatus.Finished for j in early[:5])
    assert any(j.status is JobStatus.Running for j in early[10:])
    late = clusterpy.recover_jobs(journal, timeout=60)
    assert all(j.result == j.args[0] * 10 for j in late if j.status is not JobStatus.Created)
    assert [j.status for j in late].count(JobStatus.Finished) > [j.status for j in early].count(JobStatus.Finished)


def test_journal_detects_tampering_and_wrong_secret(tmp_path):
    path = tmp_path / "j"
    writer = JournalWriter(path, SECRET.encode(), comp_id="cX", computation="f")
    for i in range(3):
        writer.append("submit", str(i), i, b"blob", None)
    writer.close()
    assert len(read_journal(path, SECRET.encode()).records) == 3
    with pytest.raises(JournalError, match="another secret"):
        read_journal(path, b"another secret that is long")
    data = bytearray(path.read_bytes())
    data[-60] ^= 1  # inside the middle of the file, not the last record's tail
    path2 = tmp_path / "j2"
    path2.write_bytes(bytes(data[: len(data) // 2 + 40]) + bytes(data[len(data) // 2 + 40:]))
    contents = read_journal(path2, SECRET.encode())
    assert contents.torn or len(contents.records) < 3
    with pytest.raises(clusterpy.ConfigurationError, match="already exists"):
        JournalWriter(path, SECRET.encode(), comp_id="cX", computation="f")


def test_vanished_clients_files_are_removed_when_the_lease_ends(start_node, tmp_path):
    node = start_node(cpus=1, extra=["--zombie-interval", "1", "--result-lease", "1"])
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, clusterpy
        cluster = clusterpy.JobCluster(abs, nodes=[sys.argv[1]])
        assert cluster.submit(-3)() == 3
        os.kill(os.getpid(), signal.SIGSTOP)   # vanish without closing the connection
    """))
    proc = subprocess.Popen([sys.executable, str(script), node.address], cwd=tmp_path)
    try:
        wait_until(lambda: [p for p in node.dest.iterdir() if p.name.startswith("c")], timeout=20)
        wait_until(lambda: "silent" in node.log(), timeout=20)
        wait_until(lambda: "lease of computation" in node.log(), timeout=20)
        wait_until(lambda: not [p for p in node.dest.iterdir() if p.name.startswith("c")], timeout=10)
    finally:
        proc.kill()
        proc.wait()
    with clusterpy.JobCluster(abs, nodes=[node.address]) as cluster:
        assert cluster.submit(-5)() == 5


def test_recover_example(node):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "recover.py"), node.address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "client died with signal 9" in out.stdout
    results = [line for line in out.stdout.splitlines() if "result=" in line]
    assert sum("Finished result=" in line for line in results) >= 2
    assert all("result=None" not in line or "Created" in line for line in results)
