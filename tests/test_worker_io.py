"""The worker's reused output files and its pipe channel, with real worker processes.

As in test_pool, the functions of this module are pickled by value.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from clusterpy._capture import read_capped_fd
from clusterpy._channel import PIPE_SIZE, ChannelReader, encode_frame, pipe_size_for, write_all
from clusterpy.pool import ComputationSpec, WorkerJob, WorkerPool

from .test_pool import result as value

cloudpickle.register_pickle_by_value(sys.modules[__name__])

_ids = iter(range(1_000_000))


def spec(workdir: Path, compute, comp_id: str = "io") -> ComputationSpec:
    return ComputationSpec(comp_id, "function", str(workdir), cloudpickle.dumps({"compute": compute}), None)


def job(*args, comp_id: str = "io") -> WorkerJob:
    return WorkerJob(f"io-{next(_ids)}", comp_id, cloudpickle.dumps((args, {})))


@pytest.fixture
async def pool1():
    async with WorkerPool(1) as p:
        yield p


# -- computations (pickled by value) ------------------------------------------------------


def say(text, pause=0.0):
    """Print ``text`` on both streams; return the inode of the stdout file and the cwd."""
    time.sleep(pause)
    print(text)
    os.write(2, f"{text}-err\n".encode())
    return os.fstat(1).st_ino, os.getcwd()


def leave_child(text, delay):
    """Start a child that writes after the job ended (not waited for)."""
    global _child
    _child = subprocess.Popen(["sh", "-c", f"sleep {delay}; echo {text}; echo {text}-err >&2"])
    print("started")
    return _child.pid


def leave_orphan(text, delay):
    """Start a grandchild that outlives its parent (a shell's `&`): reparented away from the worker."""
    os.system(f"(sleep {delay}; echo {text}; echo {text}-err >&2) &")
    print("started")


def wander():
    os.chdir("/")
    return os.getcwd()


def echo(data):
    return data


def burn(seconds, in_child):
    if in_child:
        code = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"
        subprocess.run([sys.executable, "-c", code], check=True)
    else:
        t = time.process_time()
        while time.process_time() - t < seconds:
            pass


def options():
    import clusterpy.worker

    return dict(clusterpy.worker.job_options)


def die_after_print():
    print("last words")
    os.kill(os.getpid(), 9)


def exit_soon():
    threading.Timer(0.2, os._exit, (4,)).start()
    return os.getpid()


def shout(size):
    sys.stdout.write("x" * size)
    return size


# -- the output files -----------------------------------------------------------------------


async def test_output_files_are_reused_and_emptied_between_jobs(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, say))
    a = await pool1.run(job("a"))
    b = await pool1.run(job("b"))
    assert (a.stdout, a.stderr, b.stdout, b.stderr) == (b"a\n", b"a-err\n", b"b\n", b"b-err\n")
    assert value(a)[0] == value(b)[0]  # the same file: no unlink + create per job
    pool1.add_computation(spec(tmp_path, shout, comp_id="shout"))
    big = await pool1.run(job(200_000, comp_id="shout"))
    assert big.stdout == b"x" * 200_000
    c = await pool1.run(job("c"))
    assert c.stdout == b"c\n" and value(c)[0] == value(a)[0]


async def test_a_child_left_running_never_writes_into_a_later_job(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, say))
    pool1.add_computation(spec(tmp_path, leave_child, comp_id="child"))
    before = value(await pool1.run(job("before")))[0]
    started = await pool1.run(job("late", 0.3, comp_id="child"))
    assert started.stdout == b"started\n"
    during = await pool1.run(job("next", 0.8))  # the child writes meanwhile
    assert (during.stdout, during.stderr) == (b"next\n", b"next-err\n")
    assert value(during)[0] != before  # fresh files, since a child was there
    after = await pool1.run(job("after"))
    assert after.stdout == b"after\n"


async def test_an_orphaned_grandchild_never_writes_into_a_later_job(pool1, tmp_path):
    # The shell exits at once (the worker reaps it), its background subshell is reparented
    # to init: the worker has no child left, only the changed usage of its reaped children
    # tells that something may still hold the files.
    pool1.add_computation(spec(tmp_path, say))
    pool1.add_computation(spec(tmp_path, leave_orphan, comp_id="orphan"))
    before = value(await pool1.run(job("before")))[0]
    assert (await pool1.run(job("late", 0.3, comp_id="orphan"))).stdout == b"started\n"
    during = await pool1.run(job("next", 0.8))
    assert (during.stdout, during.stderr) == (b"next\n", b"next-err\n")
    assert value(during)[0] != before
    again = await pool1.run(job("again"))
    assert again.stdout == b"again\n" and value(again)[0] == value(during)[0]  # reused again


async def test_output_of_a_killed_worker_is_its_last_job_only(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, say))
    pool1.add_computation(spec(tmp_path, die_after_print, comp_id="die"))
    assert (await pool1.run(job("earlier"))).stdout == b"earlier\n"
    died = await pool1.run(job(comp_id="die"))
    assert died.status == "died" and died.stdout == b"last words\n" and died.stderr == b""


async def test_a_worker_that_dies_idle_leaves_no_output_files(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, exit_soon))
    pid = value(await pool1.run(job()))
    assert {p.name for p in Path(pool1._capture_dir).iterdir()} == {f"{pid}.out", f"{pid}.err"}
    for _ in range(250):
        if pid not in pool1.pids and pool1.pids:
            break
        await asyncio.sleep(0.02)
    names = {p.name for p in Path(pool1._capture_dir).iterdir()}
    assert not any(name.startswith(f"{pid}.") for name in names), names


async def test_cwd_is_the_computation_directory_even_after_a_job_left_it(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, say))
    pool1.add_computation(spec(tmp_path, wander, comp_id="wander"))
    assert value(await pool1.run(job(comp_id="wander"))) == "/"
    assert value(await pool1.run(job("here")))[1] == str(tmp_path)


async def test_cpu_time_counts_the_job_and_the_children_it_waited_for(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, burn))
    own = await pool1.run(job(0.2, False))
    child = await pool1.run(job(0.2, True))
    assert own.status == child.status == "finished", (own.traceback, child.traceback)
    assert 0.19 <= own.cpu_time < 5 and 0.19 <= child.cpu_time < 5, (own.cpu_time, child.cpu_time)
    assert child.stdout == b""


async def test_job_options_reach_the_worker_when_they_change(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, options))
    first = value(await pool1.run(job()))
    assert value(await pool1.run(job())) == first and "max_file" in first
    pool1.job_options["max_file"] = 12345
    assert value(await pool1.run(job()))["max_file"] == 12345


# -- the pipe channel ------------------------------------------------------------------------


async def test_the_pipes_carry_4_mb_both_ways(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, echo))
    payload = os.urandom(4 << 20)
    assert value(await pool1.run(job(payload))) == payload
    small = value(await pool1.run(job(b"x")))
    assert small == b"x"
    (worker,) = pool1._workers
    sizes = [fcntl.fcntl(t.get_extra_info("pipe").fileno(), fcntl.F_GETPIPE_SZ)
             for t in (worker.stdin, worker.transport.get_pipe_transport(1))]
    if int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= PIPE_SIZE:
        assert sizes == [pool1._pipe_size] * 2 and pool1._pipe_size == PIPE_SIZE


def test_pipe_size_stays_within_a_quarter_of_the_users_pipe_budget():
    budget = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text()) * os.sysconf("SC_PAGE_SIZE")
    for cpus in (1, 2, 8, 64, 10_000):
        size = pipe_size_for(cpus)
        assert 64 * 1024 <= size <= PIPE_SIZE and size & (size - 1) == 0
        if budget:
            assert 2 * cpus * size <= budget // 4 or size == 64 * 1024
            assert size == PIPE_SIZE or 2 * cpus * size * 2 > budget // 4  # not smaller than needed


def test_channel_reader_reassembles_frames_split_anyhow():
    big = ("run", "j", "c", os.urandom(3 << 20), {"max_file": 1})
    messages = [("ready", 1), big, ("exit",), ("done", {"r": b"y" * 70_000})]
    wire = b"".join(b"".join(encode_frame(m, 1 << 20 if m is big else 0)) for m in messages)
    r, w = os.pipe()

    def writer() -> None:
        pos = 0
        for size in (3, 2, 100, 1 << 20, 7, 1 << 21):  # then the rest
            write_all(w, wire[pos:pos + size])
            pos += size
        write_all(w, wire[pos:] + b"\0\0")  # and a truncated header
        os.close(w)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        reader = ChannelReader(r)
        assert [reader.receive() for _ in messages] == messages
        assert reader.receive() is None
    finally:
        thread.join()
        os.close(r)


def test_read_capped_fd_reads_from_the_start_without_moving_the_offset(tmp_path):
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"0123456789" * 10_000)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        assert read_capped_fd(fd) == b"0123456789" * 10_000
        capped = read_capped_fd(fd, cap=40)
        assert capped.startswith(b"0123456789" * 2) and capped.endswith(b"0123456789" * 2)
        assert os.lseek(fd, 0, os.SEEK_CUR) == offset
    finally:
        os.close(fd)
    assert pickle.loads(b"".join(encode_frame(("x",)))[4:]) == ("x",)


def test_large_bytes_cross_the_channel_out_of_band_and_arrive_as_views_of_the_frame():
    blob, small = os.urandom(1 << 20), b"s" * 100
    message = ("done", {"result": blob, "stdout": small, "stderr": b""}, blob)
    parts = encode_frame(message, len(blob))
    # The blob (referenced twice: sent twice) is a part of its own, not copied into the pickle.
    assert len(parts) == 3 and len(parts[0]) < 1000
    assert all(isinstance(p, memoryview) and p.nbytes == len(blob) and p == blob for p in parts[1:])
    r, w = os.pipe()
    thread = threading.Thread(target=lambda: (write_all(w, parts), os.close(w)))
    thread.start()
    try:
        received = ChannelReader(r).receive()
    finally:
        thread.join()
        os.close(r)
    assert received == message
    result = received[1]["result"]
    assert isinstance(result, memoryview) and result.readonly and received[1]["stdout"] == small
    assert isinstance(received[1]["stdout"], bytes)  # small bytes stay in band


def test_a_frame_whose_out_of_band_header_lies_is_refused():
    from clusterpy._channel import loads

    payload = b"".join(encode_frame(("run", os.urandom(70_000)), 70_000))[4:]
    forged = bytearray(payload)
    forged[5:13] = (10**9).to_bytes(8, "big")  # a buffer longer than the payload
    with pytest.raises(ValueError):
        loads(bytes(forged))
    with pytest.raises(ValueError):  # a buffer the pickle never uses
        loads(payload[:1] + (2).to_bytes(4, "big") + payload[5:13] + (0).to_bytes(8, "big") + payload[13:])


async def test_a_large_argument_is_paced_into_the_pipe(pool1, tmp_path):
    # The pipe transport copies what the pipe does not take at once into its buffer: a 16 MB
    # argument goes in 256 KiB pieces as the worker reads, so that buffer never holds most of it.
    pool1.add_computation(spec(tmp_path, echo))
    payload = os.urandom(16 << 20)
    running = asyncio.create_task(pool1.run(job(payload)))
    peak = 0
    while not running.done():
        for worker in pool1._workers:
            if worker.stdin is not None:
                peak = max(peak, worker.stdin.get_write_buffer_size())
        await asyncio.sleep(0)
    assert value(await running) == payload
    assert peak < 2 << 20
