"""A worker's "done" reply (a tuple of the JobOutcome fields, checked by the node) and what the
worker's per-job fast paths must keep: fresh output files when SIGCHLD is ignored, the streams a
job put in place, per-computation environment, the channel reader's in-place decoding.

Real worker processes, as in test_pool; the functions of this module are pickled by value.
"""

from __future__ import annotations

import dataclasses
import io
import os
import signal
import subprocess
import sys
import time

import cloudpickle
import pytest

from clusterpy._channel import ChannelReader, encode_frame, write_all
from clusterpy._workjob import REPLY_FIELDS, JobOutcome, outcome_from_reply
from clusterpy.pool import WorkerPool

from .test_pool import function_spec, job, result
from .test_pool_try_run import Outcomes

cloudpickle.register_pickle_by_value(sys.modules[__name__])

GOOD = ("job-1", "finished", b"\x80\x05K\x02.", None, None, None, None, b"out", memoryview(b"err"),
        1.5, 2.5, 0.25, None)


# -- outcome_from_reply ------------------------------------------------------------------------


def test_a_reply_is_the_outcome_fields_in_their_order():
    assert REPLY_FIELDS == tuple(f.name for f in dataclasses.fields(JobOutcome))
    assert outcome_from_reply(GOOD) == JobOutcome(*GOOD)
    failed = ("j", "exception", None, b"blob", "ValueError", "bad", "Traceback...", b"", b"", 1.0, 1.0, 0.0, 3)
    assert outcome_from_reply(failed) == JobOutcome(*failed)
    payload = (b"pickle", memoryview(b"buffer"))  # a result with out-of-band buffers
    assert outcome_from_reply(GOOD[:2] + (payload,) + GOOD[3:]).result == payload


def _with(index: int, value: object) -> tuple[object, ...]:
    return GOOD[:index] + (value,) + GOOD[index + 1:]


@pytest.mark.parametrize("reply", [
    dict(zip(REPLY_FIELDS, GOOD)),  # the former dict form
    list(GOOD),
    GOOD[:-1],
    GOOD + (None,),
    None,
    _with(0, 1),  # job id
    _with(1, "died"),  # the pool's own status, never a worker's
    _with(1, b"finished"),
    _with(2, "result"),
    _with(3, ("exception",)),
    _with(4, 1),
    _with(5, b"message"),
    _with(6, 0),
    _with(7, "out"),
    _with(8, None),
    _with(9, 1),  # an int where a float time belongs: fields shifted or swapped
    _with(10, None),
    _with(11, "0.1"),
    _with(12, 1.0),
    _with(12, True),
], ids=lambda reply: type(reply).__name__)
def test_a_reply_of_another_shape_is_refused(reply):
    with pytest.raises(TypeError):
        outcome_from_reply(reply)


# -- jobs (pickled by value) -------------------------------------------------------------------


def add(x):
    return x + 1


def forge_reply(fields):
    """Send a "done" reply of the job's own making before the real one (None: do not)."""
    import clusterpy.worker

    if fields is None:
        return "loaded"
    clusterpy.worker.job_send(("done", fields))
    time.sleep(0.5)  # the pool kills this worker when it sees the forged reply
    return "not reached"


def ignore_sigchld_and_leave_orphan(delay):
    """With SIGCHLD ignored the shell is reaped by the kernel (no usage counted, no zombie);
    its background subshell, reparented away, is left holding this job's output files."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    subprocess.Popen(["sh", "-c", f"(sleep {delay}; echo late; echo late-err >&2) & exit 0"])
    time.sleep(0.2)  # the shell is gone
    print("started")


def say_after(text, pause):
    time.sleep(pause)
    print(text)
    os.write(2, f"{text}-err\n".encode())
    return os.fstat(1).st_ino


def restore_sigchld():
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def replace_stdout(text):
    """Write through a stream of the job's own (not flushed, and kept: not flushed by being
    collected either); sys.stderr is replaced too."""
    global _kept
    sys.stdout = _kept = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16))
    sys.stdout.write(text)  # stays in the buffers
    sys.stderr = io.StringIO()
    sys.stderr.write("swallowed")


def partial_lines(text):
    """Output that the line-buffered streams keep until flushed."""
    print(text, end="")
    sys.stdout.buffer.write(b"|binary")
    sys.stderr.write(f"{text}-err")


def read_env(name):
    return os.environ.get(name), os.getcwd()


# -- with real workers -------------------------------------------------------------------------


@pytest.mark.parametrize("forged", [("job",), {"job_id": "x"}, ("x",) * len(REPLY_FIELDS)],
                         ids=["short", "dict", "strings"])
async def test_a_malformed_reply_kills_the_worker_and_ends_the_job_as_died(tmp_path, forged):
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, forge_reply, comp_id="forge"))
        pool.add_computation(function_spec(tmp_path, add))
        assert result(await pool.run(job(None, comp_id="forge"))) == "loaded"
        (worker_pid,) = pool.pids
        done = Outcomes()
        assert pool.try_run(job(forged, comp_id="forge"), done)
        (outcome,) = await done.wait(1)
        assert outcome.status == "died", outcome
        assert result(await pool.run(job(41))) == 42  # a replacement serves the next job
        assert worker_pid not in pool.pids


@pytest.fixture
async def pool1():
    async with WorkerPool(1) as p:
        yield p


async def test_an_orphan_left_while_sigchld_is_ignored_never_writes_into_a_later_job(pool1, tmp_path):
    # No child left, no zombie, no change in the children's usage: only the SIGCHLD
    # disposition tells the worker that the files may be shared.
    pool1.add_computation(function_spec(tmp_path, say_after))
    pool1.add_computation(function_spec(tmp_path, ignore_sigchld_and_leave_orphan, comp_id="orphan"))
    pool1.add_computation(function_spec(tmp_path, restore_sigchld, comp_id="restore"))
    before = result(await pool1.run(job("before", 0.0)))
    assert (await pool1.run(job(0.4, comp_id="orphan"))).stdout == b"started\n"
    during = await pool1.run(job("next", 0.6))  # the orphan writes meanwhile
    assert (during.stdout, during.stderr) == (b"next\n", b"next-err\n")
    assert result(during) != before  # fresh files
    result(await pool1.run(job(comp_id="restore")))
    first, second = [result(await pool1.run(job(text, 0.0))) for text in ("a", "b")]
    assert first == second  # reused again once SIGCHLD is no longer ignored


async def test_output_left_in_buffers_or_in_streams_the_job_put_in_place_is_its_own(pool1, tmp_path):
    pool1.add_computation(function_spec(tmp_path, replace_stdout, comp_id="replace"))
    pool1.add_computation(function_spec(tmp_path, partial_lines, comp_id="partial"))
    replaced = await pool1.run(job("mine", comp_id="replace"))
    assert (replaced.status, replaced.stdout, replaced.stderr) == ("finished", b"mine", b"")
    for text in ("one", "two"):  # the worker's own streams are back, and hold nothing of before
        partial = await pool1.run(job(text, comp_id="partial"))
        assert (partial.stdout, partial.stderr) == (f"{text}|binary".encode(), f"{text}-err".encode())


async def test_environment_variables_belong_to_their_computation(pool1, tmp_path):
    os.environ.pop("CLUSTERPY_TEST_VAR", None)
    pool1.add_computation(function_spec(tmp_path, read_env, comp_id="with", env={"CLUSTERPY_TEST_VAR": "set"}))
    (tmp_path / "other").mkdir()
    pool1.add_computation(function_spec(tmp_path / "other", read_env, comp_id="without"))
    for _ in range(2):
        assert result(await pool1.run(job("CLUSTERPY_TEST_VAR", comp_id="with"))) == ("set", str(tmp_path))
        assert result(await pool1.run(job("CLUSTERPY_TEST_VAR", comp_id="without"))) == (
            None, str(tmp_path / "other"))


# -- the channel reader ------------------------------------------------------------------------


def test_a_small_out_of_band_frame_is_copied_out_of_the_read_buffer():
    # Frames read whole are decoded in place, except those whose objects may point into the
    # buffer: a view (sent out of band at any size) must survive the next read.
    small = memoryview(bytes(range(100)))
    messages = [("done", small), ("run", "j", "c", b"args", None), ("done", b"x" * 10)]
    r, w = os.pipe()
    try:
        reader = ChannelReader(r)
        got = []
        for message in messages:  # one write per frame, one read each
            write_all(w, encode_frame(message))
            got.append(reader.receive())
        assert got == messages
        assert isinstance(got[0][1], memoryview) and got[0][1] == bytes(range(100))
        write_all(w, b"".join(b"".join(encode_frame(m)) for m in messages))  # three in one read
        assert [reader.receive() for _ in messages] == messages
        os.close(w)
        w = -1
        assert reader.receive() is None
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
