"""The node's worker pool, with real worker processes.

Functions in this module are pickled *by value* (``cloudpickle.register_pickle_by_value``
below), exactly as a client's ``__main__`` functions are: the workers never import this
test module, so the tests do not depend on the tests directory being on their sys.path.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from clusterpy import _userdata
from clusterpy.errors import ClusterClosedError
from clusterpy.pool import ComputationSpec, JobOutcome, WorkerJob, WorkerPool
from clusterpy._channel import loads as channel_loads
from clusterpy.worker import FrameDecoder, encode_frame, read_capped

cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except OSError:
        return False


async def eventually(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def function_spec(tmp_path: Path, compute, *, comp_id: str = "comp", setup=None, cleanup=None,
                  depends=(), setup_args=(), env=None) -> ComputationSpec:
    bundle = cloudpickle.dumps({"compute": compute, "setup": setup, "cleanup": cleanup,
                                "depends": list(depends), "setup_args": tuple(setup_args)})
    return ComputationSpec(comp_id, "function", str(tmp_path), bundle, None, env)


_job_ids = iter(range(1_000_000))


def job(*args, comp_id: str = "comp", **kwargs) -> WorkerJob:
    return WorkerJob(f"job-{next(_job_ids)}", comp_id, cloudpickle.dumps((args, kwargs)))


def result(outcome: JobOutcome):
    assert outcome.status == "finished", (outcome.status, outcome.traceback, outcome.exc_message)
    return _userdata.loads(outcome.result)


@pytest.fixture
async def pool():
    async with WorkerPool(2) as p:
        yield p


# ---------------------------------------------------------------------------------------
# computations used by the tests (pickled by value)
# ---------------------------------------------------------------------------------------


def add(x, y=0, *, scale=1):
    return (x + y) * scale


def noisy(n):
    print("print", n)
    sys.stderr.write("stderr via sys\n")
    os.write(1, b"raw fd 1\n")
    os.write(2, b"raw fd 2\n")
    subprocess.run(["echo", "from a child"], check=True)
    return [sys.stdin.read(), n]


def divide(a, b):
    return a / b


class CustomError(Exception):
    pass


def raise_custom():
    raise CustomError("custom failure")


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("no pickling for you")


def raise_unpicklable():
    raise Unpicklable("cannot travel")


def return_unpicklable():
    import threading

    return threading.Lock()


def exit_job():
    sys.exit(5)


def whoami():
    return os.getpid()


def sleep_and_pid(seconds):
    time.sleep(seconds)
    return os.getpid()


def die(how):
    print("last words")
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "segv":
        import ctypes

        ctypes.string_at(0)
    return "survived"


def job_context():
    import clusterpy.worker

    return clusterpy.worker.current_job_id, os.getcwd(), os.environ.get("POOL_TEST_VAR"), sys.path[0]


def exit_soon_after_the_job():
    import threading

    threading.Timer(0.2, os._exit, (4,)).start()
    return os.getpid()


def counting_setup(path):
    global _setup_state
    _setup_state = {"pid": os.getpid(), "calls": 0}
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return 0


def counting_compute(pause):
    time.sleep(pause)
    _setup_state["calls"] += 1  # noqa: F821 -- created by counting_setup in the shared globals
    return _setup_state["pid"], _setup_state["calls"]  # noqa: F821


def failing_setup():
    raise RuntimeError("setup exploded")


def refusing_setup():
    return -1  # dispy's "setup failed" convention


def uses_depends(x):
    return _dep_square(x), _DepPoint(x, 1).total()  # noqa: F821 -- injected from `depends`


def cleanup_marker():
    with open("cleaned", "a") as f:  # relative: runs in the computation's workdir
        f.write(f"{os.getpid()}\n")


def start_grandchild():
    return subprocess.Popen(["sleep", "60"]).pid


# ---------------------------------------------------------------------------------------
# sans-IO pieces
# ---------------------------------------------------------------------------------------


def test_frame_decoder_handles_any_split():
    messages = [("ready", 1), ("done", {"x": b"\0" * 1000}), ("loaded", "c", None)]
    wire = b"".join(b"".join(encode_frame(m)) for m in messages)
    decoder = FrameDecoder()
    frames = []
    for i in range(len(wire)):
        frames += decoder.feed(wire[i:i + 1])
    assert [pickle.loads(f) for f in frames] == messages
    assert decoder.pending == 0
    assert [pickle.loads(f) for f in FrameDecoder().feed(wire)] == messages
    # a large message's blob travels out of band, beside the pickle, and decodes the same
    big = ("done", {"result": bytes(range(256)) * 1024})
    big_wire = b"".join(encode_frame(big, 1 << 20))
    assert len(encode_frame(big, 1 << 20)) == 2 and len(encode_frame(big)) == 1
    decoder = FrameDecoder()
    assert decoder.feed(wire[:3]) == [] and decoder.pending == 3
    assert [pickle.loads(f) for f in decoder.feed(wire[3:] + big_wire[:10])] == messages
    assert [channel_loads(f) for f in decoder.feed(big_wire[10:])] == [big]


def test_read_capped_keeps_head_and_tail(tmp_path):
    path = tmp_path / "out"
    path.write_bytes(b"A" * 100 + b"B" * 100)
    assert read_capped(str(path), cap=1000) == b"A" * 100 + b"B" * 100
    capped = read_capped(str(path), cap=20)
    assert capped.startswith(b"A" * 10) and capped.endswith(b"B" * 10)
    assert b"180 bytes of output cut" in capped
    assert read_capped(str(tmp_path / "missing")) == b""


def test_spec_validation(tmp_path):
    p = WorkerPool(1)
    with pytest.raises(ValueError):
        p.add_computation(ComputationSpec("c", "function", str(tmp_path), None, None))
    with pytest.raises(ValueError):
        p.add_computation(ComputationSpec("c", "program", str(tmp_path), None, []))
    with pytest.raises(ValueError):
        p.add_computation(ComputationSpec("c", "function", "relative", b"x", None))
    p.add_computation(function_spec(tmp_path, add))
    with pytest.raises(ValueError):
        p.add_computation(function_spec(tmp_path, divide))


# ---------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------


async def test_results_and_kwargs(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, add))
    outcome = await pool.run(job(2, 3, scale=10))
    assert result(outcome) == 50
    assert outcome.exit_code is None and outcome.exception is None
    assert outcome.start_time <= outcome.end_time and outcome.cpu_time >= 0
    assert result(await pool.run(job(1))) == 1
    assert pool.busy == 0


async def test_output_is_captured_at_fd_level(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, noisy))
    outcome = await pool.run(job(7))
    assert result(outcome) == ["", 7]  # stdin is /dev/null, not the command channel
    assert outcome.stdout == b"print 7\nraw fd 1\nfrom a child\n"
    assert outcome.stderr == b"stderr via sys\nraw fd 2\n"
    # the next job starts with empty output, and the channel survived all of that
    second = await pool.run(job(8))
    assert second.stdout.startswith(b"print 8\n") and b"7" not in second.stdout


async def test_exception_travels_with_traceback(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, divide))
    outcome = await pool.run(job(1, 0))
    assert outcome.status == "exception"
    assert outcome.exc_type == "ZeroDivisionError"
    assert outcome.exc_message == "division by zero"
    assert "in divide" in outcome.traceback
    # cloudpickle >= 3.1 ships code as "<dynamic-code>", without source lines: the client puts
    # them back (clusterpy/_tracebacks.py, tested in test_cluster.py).
    assert "return a / b" in outcome.traceback or '"<dynamic-code>", line' in outcome.traceback
    assert "clusterpy/worker.py" not in outcome.traceback  # our own frame is cut
    assert isinstance(cloudpickle.loads(outcome.exception), ZeroDivisionError)


async def test_custom_and_unpicklable_exceptions(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, raise_custom, comp_id="custom"))
    pool.add_computation(function_spec(tmp_path, raise_unpicklable, comp_id="unpicklable"))
    pool.add_computation(function_spec(tmp_path, return_unpicklable, comp_id="bad-result"))
    pool.add_computation(function_spec(tmp_path, exit_job, comp_id="exit"))

    custom = await pool.run(job(comp_id="custom"))
    assert custom.exc_type == "CustomError"
    assert isinstance(cloudpickle.loads(custom.exception), CustomError)

    unpicklable = await pool.run(job(comp_id="unpicklable"))
    assert unpicklable.status == "exception" and unpicklable.exception is None
    assert (unpicklable.exc_type, unpicklable.exc_message) == ("Unpicklable", "cannot travel")

    bad = await pool.run(job(comp_id="bad-result"))
    assert bad.status == "exception" and bad.exc_type == "PicklingError"
    assert "could not be pickled" in bad.exc_message and "lock" in bad.exc_message

    exited = await pool.run(job(comp_id="exit"))
    assert exited.status == "exception" and exited.exc_type == "SystemExit"
    assert exited.exit_code is None
    assert len(pool.pids) == 2  # sys.exit() ended the job, not the worker


async def test_closure_and_lambda(pool, tmp_path):
    offset = 100

    def closure(x):
        return x + offset

    pool.add_computation(function_spec(tmp_path, closure, comp_id="closure"))
    pool.add_computation(function_spec(tmp_path, lambda x: x * 2, comp_id="lambda"))
    assert result(await pool.run(job(1, comp_id="closure"))) == 101
    assert result(await pool.run(job(21, comp_id="lambda"))) == 42


async def test_setup_runs_once_per_worker_and_shares_globals(pool, tmp_path):
    log = tmp_path / "setups"
    pool.add_computation(function_spec(tmp_path, counting_compute, setup=counting_setup, setup_args=(str(log),)))
    outcomes = await asyncio.gather(*(pool.run(job(0.05)) for _ in range(8)))
    pairs = [result(o) for o in outcomes]
    pids = {pid for pid, _ in pairs}
    assert pids == set(pool.pids)  # both workers took jobs
    setups = log.read_text().split()
    assert sorted(setups) == sorted(str(pid) for pid in pids)  # once per worker
    for pid in pids:  # the state set up once accumulated over that worker's jobs
        assert sorted(n for p, n in pairs if p == pid) == list(range(1, 1 + sum(p == pid for p, _ in pairs)))


async def test_depends_are_injected(pool, tmp_path):
    def _dep_square(x):
        return x * x

    class _DepPoint:
        def __init__(self, a, b):
            self.a, self.b = a, b

        def total(self):
            return self.a + self.b

    pool.add_computation(function_spec(tmp_path, uses_depends, depends=[_dep_square, _DepPoint]))
    assert result(await pool.run(job(4))) == (16, 5)


async def test_setup_failure_fails_every_job(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, add, comp_id="raises", setup=failing_setup))
    pool.add_computation(function_spec(tmp_path, add, comp_id="refuses", setup=refusing_setup))
    for _ in range(3):
        outcome = await pool.run(job(1, comp_id="raises"))
        assert outcome.status == "setup_failed"
        assert outcome.exc_type == "RuntimeError" and "setup exploded" in outcome.traceback
        assert isinstance(cloudpickle.loads(outcome.exception), RuntimeError)
    refused = await pool.run(job(1, comp_id="refuses"))
    assert refused.status == "setup_failed" and "setup returned -1" in refused.exc_message
    pool.add_computation(function_spec(tmp_path, add, comp_id="fine"))
    assert result(await pool.run(job(1, 2, comp_id="fine"))) == 3


async def test_job_context_env_cwd_and_current_job_id(pool, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    pool.add_computation(function_spec(workdir, job_context, env={"POOL_TEST_VAR": "yes"}))
    j = job()
    job_id, cwd, var, path0 = result(await pool.run(j))
    assert job_id == j.job_id
    assert (cwd, var, path0) == (str(workdir), "yes", str(workdir))


# ---------------------------------------------------------------------------------------
# programs
# ---------------------------------------------------------------------------------------


async def test_program_args_exit_code_and_output(pool, tmp_path):
    script = tmp_path / "prog.sh"
    script.write_text('#!/bin/sh\necho "args: $*"\necho "var=$POOL_TEST_VAR cwd=$(pwd)"\necho oops >&2\nexit "$1"\n')
    script.chmod(0o755)
    pool.add_computation(ComputationSpec("prog", "program", str(tmp_path), None, [str(script)], {"POOL_TEST_VAR": "v"}))
    outcome = await pool.run(job(3, "two words", 1.5, comp_id="prog"))
    assert outcome.status == "finished"
    assert result(outcome) == 3 and outcome.exit_code == 3
    assert outcome.stdout == f"args: 3 two words 1.5\nvar=v cwd={tmp_path}\n".encode()
    assert outcome.stderr == b"oops\n"
    ok = await pool.run(job(0, comp_id="prog"))
    assert result(ok) == 0 and ok.exit_code == 0

    pool.add_computation(ComputationSpec("py", "program", str(tmp_path), None, [sys.executable, "-c", "import sys; print(sys.argv[1:])"]))
    assert (await pool.run(job("a", 2, comp_id="py"))).stdout == b"['a', '2']\n"

    pool.add_computation(ComputationSpec("missing", "program", str(tmp_path), None, [str(tmp_path / "nope")]))
    missing = await pool.run(job(comp_id="missing"))
    assert missing.status == "exception" and missing.exc_type == "FileNotFoundError"


# ---------------------------------------------------------------------------------------
# failures of the worker process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "code"), [("exit", 3), ("kill", -signal.SIGKILL), ("segv", -signal.SIGSEGV)])
async def test_dead_worker_fails_only_its_job(pool, tmp_path, how, code):
    pool.add_computation(function_spec(tmp_path, die))
    before = set(pool.pids)
    outcome = await pool.run(job(how))
    assert outcome.status == "died" and outcome.exit_code == code
    assert outcome.exc_type == "WorkerDiedError" and str(abs(code)) in outcome.exc_message
    assert outcome.stdout == b"last words\n"  # output written before the death is kept
    if how == "segv":
        assert b"Fatal Python error: Segmentation fault" in outcome.stderr
        assert b"in die" in outcome.stderr
    # the pool replaced the worker and keeps working
    await eventually(lambda: len(pool.pids) == 2)
    assert len(before - set(pool.pids)) == 1
    outcomes = await asyncio.gather(*(pool.run(job("no")) for _ in range(4)))
    assert [result(o) for o in outcomes] == ["survived"] * 4


async def test_worker_dying_while_idle_is_replaced(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, exit_soon_after_the_job))
    pid = result(await pool.run(job()))
    await eventually(lambda: pid not in pool.pids and len(pool.pids) == 2)
    outcomes = await asyncio.gather(*(pool.run(job()) for _ in range(2)))
    assert all(o.status == "finished" for o in outcomes)


async def test_terminate_long_job(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid))
    assert await pool.terminate("no-such-job") is False
    long = job(30)
    began = time.monotonic()
    task = asyncio.create_task(pool.run(long))
    await eventually(lambda: pool.busy == 1)
    await asyncio.sleep(0.2)
    assert await pool.terminate(long.job_id) is True
    outcome = await task
    assert outcome.status == "terminated" and outcome.exit_code == -signal.SIGKILL
    assert time.monotonic() - began < 5
    await eventually(lambda: len(pool.pids) == 2)
    assert isinstance(result(await pool.run(job(0))), int)


def fork_a_channel_holder(pid_file):
    # A grandchild in its own session keeps every fd of the worker, its channel too: the
    # worker's exit is then seen only after the pool's flush delay.
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(5)
        os._exit(0)
    with open(pid_file, "a") as f:
        f.write(f"{pid}\n")
    time.sleep(0.1)
    return pid


async def test_terminate_racing_a_finished_job_never_hands_on_the_killed_worker(tmp_path):
    # The job's reply is already in the pipe when terminate() kills its worker, and the
    # worker's exit is not seen yet: whatever the first job's outcome, the killed worker must
    # not be handed the next job (it would end "terminated" though nobody cancelled it).
    pid_file = tmp_path / "holder.pid"
    async with WorkerPool(1) as pool:
        pool.add_computation(function_spec(tmp_path, fork_a_channel_holder))
        first = job(str(pid_file))
        try:
            task = asyncio.create_task(pool.run(first))
            await eventually(lambda: pool.busy == 1)
            time.sleep(0.5)  # block the loop: the worker finishes and writes its reply meanwhile
            assert await pool.terminate(first.job_id) is True  # nothing awaited: the reply is unread
            assert (await task).status in ("finished", "terminated")
            second = await pool.run(job(str(pid_file)))
            assert second.status == "finished", (second.status, second.exc_message)
        finally:
            for line in pid_file.read_text().split() if pid_file.exists() else []:
                try:
                    os.kill(int(line), signal.SIGKILL)
                except ProcessLookupError:
                    pass


async def test_cancelling_run_kills_and_replaces_the_worker(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid))
    before = set(pool.pids)
    task = asyncio.create_task(pool.run(job(30)))
    await eventually(lambda: pool.busy == 1)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.busy == 0
    await eventually(lambda: len(pool.pids) == 2 and len(before & set(pool.pids)) == 1)
    (gone,) = before - set(pool.pids)
    await eventually(lambda: not alive(gone))
    assert result(await pool.run(job(0))) in pool.pids


async def test_cancelling_a_queued_run_keeps_the_workers(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid))
    before = set(pool.pids)
    running = [asyncio.create_task(pool.run(job(0.3))) for _ in range(2)]
    await eventually(lambda: pool.busy == 2)
    queued = asyncio.create_task(pool.run(job(0)))
    await asyncio.sleep(0.05)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert {result(await t) for t in running} == before
    assert set(pool.pids) == before


async def test_two_cpus_run_two_jobs_at_once(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid))
    await asyncio.gather(pool.run(job(0)), pool.run(job(0)))  # load the computation everywhere
    began = time.monotonic()
    outcomes = await asyncio.gather(pool.run(job(0.5)), pool.run(job(0.5)))
    elapsed = time.monotonic() - began
    assert {result(o) for o in outcomes} == set(pool.pids)
    assert 0.5 <= elapsed < 0.9


# ---------------------------------------------------------------------------------------
# computations' lifecycle and closing
# ---------------------------------------------------------------------------------------


async def test_cleanup_runs_on_remove_computation(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid, cleanup=cleanup_marker))
    pids = {result(o) for o in await asyncio.gather(pool.run(job(0.2)), pool.run(job(0.2)))}
    assert pids == set(pool.pids)
    await pool.remove_computation("comp")
    assert sorted((tmp_path / "cleaned").read_text().split()) == sorted(map(str, pids))
    with pytest.raises(KeyError):
        await pool.run(job(0))
    await pool.remove_computation("comp")  # unknown ids are ignored


async def test_cleanup_of_busy_worker_runs_after_its_job(pool, tmp_path):
    pool.add_computation(function_spec(tmp_path, sleep_and_pid, cleanup=cleanup_marker))
    task = asyncio.create_task(pool.run(job(0.3)))
    await eventually(lambda: pool.busy == 1)
    await pool.remove_computation("comp")
    pid = result(await task)
    await eventually(lambda: (tmp_path / "cleaned").exists())
    assert (tmp_path / "cleaned").read_text().split() == [str(pid)]


async def test_aclose_leaves_no_process_behind(tmp_path):
    pool = WorkerPool(2)
    await pool.start()
    pool.add_computation(function_spec(tmp_path, start_grandchild, comp_id="child"))
    pool.add_computation(function_spec(tmp_path, sleep_and_pid, comp_id="sleep", cleanup=cleanup_marker))
    grandchild = result(await pool.run(job(comp_id="child")))
    await pool.run(job(0, comp_id="sleep"))
    busy = asyncio.create_task(pool.run(job(30, comp_id="sleep")))
    await eventually(lambda: pool.busy == 1)
    workers = pool.pids
    assert len(workers) == 2 and alive(grandchild)

    await pool.aclose()
    assert (await busy).status == "terminated"
    for pid in [*workers, grandchild]:
        await eventually(lambda pid=pid: not alive(pid))
    assert pool.pids == []
    with pytest.raises(ClusterClosedError):
        await pool.run(job(0, comp_id="sleep"))
    await pool.aclose()  # idempotent


async def test_closing_fails_waiting_runs(tmp_path):
    pool = WorkerPool(1)
    await pool.start()
    pool.add_computation(function_spec(tmp_path, sleep_and_pid))
    running = asyncio.create_task(pool.run(job(30)))
    await eventually(lambda: pool.busy == 1)
    waiting = asyncio.create_task(pool.run(job(0)))
    await asyncio.sleep(0.05)
    await pool.aclose()
    assert (await running).status == "terminated"
    with pytest.raises(ClusterClosedError):
        await waiting


async def test_run_before_start_is_an_error(tmp_path):
    pool = WorkerPool(1)
    pool.add_computation(function_spec(tmp_path, add))
    with pytest.raises(RuntimeError):
        await pool.run(job(1))
    await pool.aclose()
