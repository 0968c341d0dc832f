"""Large buffers travel as pickle-5 out-of-band buffers: never copied into a pickle, rebuilt on
views of the received frame. Shown on the sans-IO pieces, then through a real node."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import clusterpy
from clusterpy import _userdata
from clusterpy._submit import dumps_args
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m

from .conftest import REPO


def test_a_numpy_argument_is_a_buffer_beside_the_pickle_not_inside_it():
    array = np.arange(200_000, dtype=np.float64)  # 1.6 MB
    payload = dumps_args((array, 3), {})
    assert type(payload) is tuple and len(payload[0]) < 1000
    (buffer,) = payload[1:]
    assert isinstance(buffer, bytearray) and buffer == array.tobytes()  # a snapshot, taken at submit
    array[0] = -1.0
    (args, kwargs) = _userdata.loads(payload)
    assert args[0][0] == 0.0 and args[1] == 3 and kwargs == {}

    # In a message, the buffer is a part of its own: the very object, not a copy.
    parts = codec.encode_parts(m.SubmitJobs("c", (m.JobRequest("j", 1, payload),)))
    assert any(isinstance(p, memoryview) and p.obj is buffer for p in parts)


def test_large_bytes_go_out_of_band_without_a_copy_and_come_back_as_bytes():
    blob = os.urandom(1 << 20)
    payload = dumps_args((blob,), {})
    assert type(payload) is tuple and payload[1] is blob  # bytes are immutable: no snapshot needed
    (args, _) = _userdata.loads(payload)
    assert type(args[0]) is bytes and args[0] == blob
    small = dumps_args((b"x" * 100,), {})
    assert type(small) is bytes and pickle.loads(small) == ((b"x" * 100,), {})


def test_a_result_is_rebuilt_on_a_writable_view_of_the_received_frame():
    array = np.ones((300, 300))
    payload = _userdata.dumps(array)  # a worker's result: views of the array itself
    assert type(payload) is tuple and payload[1].obj is not None and not payload[1].readonly
    done = m.JobDone("c", "j", 1, "finished", payload, None, None, None, None, b"", b"", 0.0, 0.0, 0.0, None)
    frame = bytearray(b"".join(codec.encode_parts(done)))  # as a large frame is received
    result = _userdata.loads(codec.decode(frame).result)
    assert np.array_equal(result, array) and result.flags.writeable and not result.flags.owndata
    assert _userdata.size(payload) == sum(memoryview(p).nbytes for p in payload)


def scale(array, factor):
    # Runs in a worker: the argument arrives as a view of the received frame, writable.
    flags = (array.flags.owndata, array.flags.writeable)
    array *= factor
    return array, flags


def echo(value):
    return value


def test_numpy_arrays_cross_a_real_node_both_ways_without_copies(node):
    array = np.arange(500_000, dtype=np.float64)  # 4 MB
    with clusterpy.JobCluster(scale, nodes=[node.address]) as cluster:
        job = cluster.submit(array, 2.0)
        array[:] = 0.0  # after submit: the job still gets what was submitted
        result, (owndata, writeable) = job()
    assert job.status is clusterpy.JobStatus.Finished, job.exception
    assert not owndata and writeable  # in the worker: a writable view, not a copy
    assert np.array_equal(result, np.arange(500_000, dtype=np.float64) * 2.0)
    assert result.flags.writeable and not result.flags.owndata  # on the client: a view of the frame


@pytest.mark.parametrize("value", [os.urandom(3 << 20), bytearray(os.urandom(200_000)),
                                   {"a": np.zeros(100_000, dtype=np.int32), "b": [os.urandom(70_000)]}],
                         ids=["bytes", "bytearray", "nested"])
def test_large_values_keep_their_types_through_a_real_node(node, value):
    with clusterpy.JobCluster(echo, nodes=[node.address]) as cluster:
        got = cluster.submit(value)()
    assert type(got) is type(value)
    if isinstance(value, dict):
        assert np.array_equal(got["a"], value["a"]) and got["b"] == value["b"]
    else:
        assert got == value


def test_the_numpy_example_runs_against_a_node(node):
    out = subprocess.run([sys.executable, str(REPO / "examples" / "numpy_arrays.py"), node.address],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "8 blocks, 128 MB there and back" in out.stdout and "every block normalized" in out.stdout


CRASHING_CLIENT = """
import os, signal, sys
import numpy as np
import clusterpy

def scale(array, factor):
    return array * factor

with clusterpy.JobCluster(scale, nodes=[sys.argv[1]], recover_file=sys.argv[2]) as cluster:
    jobs = [cluster.submit(np.full(100_000, float(i)), 3.0) for i in range(3)]
    for job in jobs:
        job()
    print("done", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_journal_keeps_out_of_band_arguments_and_results(node, tmp_path):
    # The journal pickles in band what crossed out of band; recover_jobs rebuilds it.
    journal, script = tmp_path / "journal.pkl", tmp_path / "client.py"
    script.write_text(CRASHING_CLIENT)
    out = subprocess.run([sys.executable, str(script), node.address, str(journal)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == -9 and "done" in out.stdout, out.stderr
    jobs = clusterpy.recover_jobs(journal, timeout=30)
    assert [float(job.args[0][0]) for job in jobs] == [0.0, 1.0, 2.0]
    assert all(job.args[0].shape == (100_000,) and np.all(job.result == job.args[0] * 3.0) for job in jobs)


def test_numpy_arrays_cross_a_shared_scheduler(start_node, tmp_path):
    # The scheduler is one more hop: it relays the buffers from the views it decoded.
    from .test_shared import SchedulerProcess

    scheduler = SchedulerProcess(tmp_path, [start_node(cpus=2)], ())
    try:
        arrays = [np.full(300_000, float(i)) for i in range(4)]
        with clusterpy.SharedJobCluster(scale, scheduler.address) as cluster:
            results = [job() for job in [cluster.submit(a, 2.0) for a in arrays]]
    finally:
        scheduler.stop()
    assert all(np.array_equal(result, a * 2.0) and writeable for (result, (_, writeable)), a in zip(results, arrays))


def nap(seconds):
    import time

    time.sleep(seconds)
    return seconds


def test_a_job_cancelled_before_dispatch_counts_its_out_of_band_bytes(node):
    # Its statistics record is made at its end: the size is that of all its parts, buffers too.
    array = np.zeros(200_000)  # 1.6 MB
    with clusterpy.JobCluster(nap, nodes=[node.address], prefetch=0) as cluster:
        busy = [cluster.submit(0.5), cluster.submit(0.5)]  # both CPUs
        waiting = cluster.submit(array)  # held by the client: no CPU is free
        assert cluster.cancel(waiting)
        for job in busy:
            job()
        (record,) = [r for r in cluster.stats().jobs if r.job_id == str(waiting.id)]
    assert record.status == "Cancelled" and record.bytes_sent >= array.nbytes
