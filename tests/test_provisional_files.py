"""Provisional results and files sent back by running jobs, against real nodes on loopback."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

import pytest

import clusterpy
from clusterpy import JobStatus
from clusterpy.errors import FileTooLargeError
from clusterpy.jobfiles import FileReceiver
from clusterpy.errors import ClusterError

from .conftest import REPO
from .test_shared import start_scheduler  # noqa: F401 (fixture)


def counting(n):
    import time

    import clusterpy

    for i in range(n):
        clusterpy.provisional_result({"step": i, "of": n})
        time.sleep(0.005)
    return f"done {n}"


def make_file(size, name):
    import hashlib
    import random

    import clusterpy

    data = random.Random(size).randbytes(size)
    with open(name, "wb") as f:
        f.write(data)
    sent_as = clusterpy.send_file(name)
    os.unlink(name)  # the call returned: the file was read
    return sent_as, hashlib.sha256(data).hexdigest()


def makes_files(n):
    os.makedirs("sub", exist_ok=True)
    with open("a.txt", "w") as f:
        f.write(f"a{n}")
    with open("sub/b.txt", "w") as f:
        f.write(f"b{n}")
    with open("input.txt") as f:  # a dependency, still reachable by its relative path
        return f.read()


def test_provisional_results_arrive_in_order_before_the_final_result(node):
    seen: dict[int, list[tuple[JobStatus, object]]] = {}
    lock = threading.Lock()

    def callback(job):
        with lock:
            seen.setdefault(job.id, []).append((job.status, job.result))

    with clusterpy.JobCluster(counting, nodes=[node.address], callback=callback) as cluster:
        jobs = [cluster.submit(n) for n in (5, 8, 3)]
        assert [job() for job in jobs] == ["done 5", "done 8", "done 3"]
        cluster.wait()
        stats = cluster.stats()
    for job, n in zip(jobs, (5, 8, 3)):
        events = seen[job.id]
        assert events[:-1] == [(JobStatus.ProvisionalResult, {"step": i, "of": n}) for i in range(n)]
        assert events[-1] == (JobStatus.Finished, f"done {n}")
        assert job.status is JobStatus.Finished and job.result == f"done {n}"
    assert stats.nodes[0].provisional_results == 16
    assert [j.provisional_results for j in stats.jobs] == [5, 8, 3]


def test_provisional_result_outside_a_job_is_an_error():
    with pytest.raises(RuntimeError, match="inside a running clusterpy job"):
        clusterpy.provisional_result(1)
    with pytest.raises(RuntimeError):
        clusterpy.send_file(__file__)


def test_a_file_made_on_the_node_arrives_intact(node, tmp_path):
    files = tmp_path / "back"
    with clusterpy.JobCluster(make_file, nodes=[node.address], files_dir=str(files)) as cluster:
        big = cluster.submit(3 * 1024 * 1024 + 17, "big.bin")  # several 1 MiB pieces
        small = cluster.submit_job((10, "small.bin"), job_id="small-job")
        empty = cluster.submit(0, "empty.bin")
        for job, name, size in ((big, "big.bin", 3 * 1024 * 1024 + 17), (small, "small.bin", 10), (empty, "empty.bin", 0)):
            sent_as, digest = job()
            assert sent_as == name
            path = files / str(job.id) / name
            assert job.files == [str(path)]
            assert path.stat().st_size == size
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
        stats = cluster.stats()
    assert (files / "small-job" / "small.bin").is_file()
    assert stats.nodes[0].files_received == 3
    assert stats.nodes[0].bytes_received >= 3 * 1024 * 1024
    assert not [p for p in files.rglob(".*part*")]  # no temporary file left


def test_an_over_limit_file_is_refused_clearly(start_node, tmp_path):
    node = start_node(cpus=1, extra=["--max-send-file", "1M"])
    files = tmp_path / "back"
    with clusterpy.JobCluster(make_file, nodes=[node.address], files_dir=str(files)) as cluster:
        job = cluster.submit(1024 * 1024 + 1, "toolarge.bin")
        with pytest.raises(FileTooLargeError) as info:
            job()
        message = str(info.value)
        assert "1048577 bytes" in message and "limit of 1048576 bytes" in message
        assert "--max-send-file" in message
        assert job.status is JobStatus.Terminated and job.files == []
        # Exactly at the limit is fine.
        fits = cluster.submit(1024 * 1024, "fits.bin")
        fits()
        assert (files / str(fits.id) / "fits.bin").stat().st_size == 1024 * 1024
    assert not (files / str(job.id)).exists()


def test_the_client_limit_and_unsafe_names_are_refused(tmp_path):
    receiver = FileReceiver(tmp_path, max_size=100)
    with pytest.raises(ClusterError, match="over this client's limit"):
        receiver.piece(("1", 1, "x"), "1", b"y" * 101, False, None)
    assert receiver.piece(("1", 1, "x"), "1", b"", True, None) is None  # the rest is ignored
    with pytest.raises(ClusterError, match="unsafe file name"):
        receiver.piece(("1", 1, "../escape"), "1", b"y", True, None)
    os.symlink(tmp_path.parent, tmp_path / "1" / "link")
    with pytest.raises(ClusterError, match="cannot write"):
        receiver.piece(("1", 1, "link/x"), "1", b"y", True, None)
    assert not (tmp_path.parent / "x").exists() and not (tmp_path / "1" / "x").exists()
    assert receiver.piece(("1", 1, "ok/fine"), "1", b"y", True, None) == str(tmp_path / "1" / "ok" / "fine")


def test_return_files_brings_back_what_each_job_made(node, tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("shared input")
    files = tmp_path / "back"
    with clusterpy.JobCluster(makes_files, nodes=[node.address], depends=[str(data)], return_files=True,
                              files_dir=str(files)) as cluster:
        jobs = [cluster.submit(i) for i in range(4)]
        assert [job() for job in jobs] == ["shared input"] * 4
    for i, job in enumerate(jobs):
        assert sorted(os.path.relpath(p, files / str(job.id)) for p in job.files) == ["a.txt", "sub/b.txt"]
        assert (files / str(job.id) / "a.txt").read_text() == f"a{i}"
        assert (files / str(job.id) / "sub" / "b.txt").read_text() == f"b{i}"
        assert not (files / str(job.id) / "input.txt").exists()  # only what the job made


def uses_scattered(table, key):
    with open(f"{key}.txt", "w") as f:
        f.write(str(table[key]))
    return len(table)


def test_return_files_jobs_see_scattered_objects(node, tmp_path):
    with clusterpy.JobCluster(uses_scattered, nodes=[node.address], return_files=True,
                              files_dir=str(tmp_path)) as cluster:
        table = cluster.scatter({f"k{i}": i * i for i in range(100)})
        jobs = [cluster.submit(table, f"k{i}") for i in range(3)]
        assert [job() for job in jobs] == [100] * 3
    assert [(tmp_path / str(job.id) / f"k{i}.txt").read_text() for i, job in enumerate(jobs)] == ["0", "1", "4"]


def test_return_files_works_for_programs_too(node, tmp_path):
    program = tmp_path / "writer.py"
    program.write_text("import sys\nopen(f'out-{sys.argv[1]}.txt', 'w').write('x' * int(sys.argv[1]))\n")
    with clusterpy.JobCluster(str(program), nodes=[node.address], return_files=True,
                              files_dir=str(tmp_path / "back")) as cluster:
        jobs = [cluster.submit(n) for n in (3, 5)]
        assert [job() for job in jobs] == [0, 0]
    for job, n in zip(jobs, (3, 5)):
        assert job.files == [str(tmp_path / "back" / str(job.id) / f"out-{n}.txt")]
        assert (tmp_path / "back" / str(job.id) / f"out-{n}.txt").read_text() == "x" * n


def test_provisional_example_runs(node, tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "provisional.py"), node.address],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "progress 50%" in out.stdout and "final" in out.stdout and "report-beta.txt: beta: sum" in out.stdout


def test_provisional_results_and_files_come_through_the_shared_scheduler(start_node, start_scheduler, tmp_path):
    sched = start_scheduler([start_node(cpus=2)])
    seen: dict[int, list[object]] = {}
    lock = threading.Lock()

    def callback(job):
        if job.status is JobStatus.ProvisionalResult:
            with lock:
                seen.setdefault(job.id, []).append(job.result)

    with clusterpy.SharedJobCluster(counting, sched.address, callback=callback) as cluster:
        jobs = [cluster.submit(n) for n in (4, 6)]
        assert [job() for job in jobs] == ["done 4", "done 6"]
        cluster.wait()
    assert [seen[job.id] for job in jobs] == [[{"step": i, "of": n} for i in range(n)] for n in (4, 6)]
    files = tmp_path / "back"
    with clusterpy.SharedJobCluster(make_file, sched.address, files_dir=str(files)) as cluster:
        job = cluster.submit(2 * 1024 * 1024 + 5, "big.bin")
        sent_as, digest = job()
        path = files / str(job.id) / "big.bin"
        assert job.files == [str(path)] and hashlib.sha256(path.read_bytes()).hexdigest() == digest
