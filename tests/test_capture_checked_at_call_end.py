"""The worker looks for processes that may hold its capture files as a call ends, once fds 1
and 2 are /dev/null again (clusterpy._capture.Output): one ``getrusage`` then serves that check
and the call's children CPU. What that must not change, with real worker processes:

- a process started between calls (by a thread a job left behind) gets /dev/null, never a
  later job's files;
- the CPU of a job's children reaped between calls (by a thread it left behind), or of a
  computation's cleanup's, is no later job's ``cpu_time``.

As in test_pool, the functions of this module are pickled by value.
"""

from __future__ import annotations

import asyncio
import sys
import threading

import cloudpickle

from clusterpy.pool import ComputationSpec

from .test_worker_io import job, pool1  # noqa: F401 (fixture)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BURN = 0.3  # CPU seconds a child burns


def spec(workdir, compute, comp_id: str = "io", cleanup=None) -> ComputationSpec:
    return ComputationSpec(comp_id, "function", str(workdir),
                           cloudpickle.dumps({"compute": compute, "cleanup": cleanup}), None)


# -- computations (pickled by value) ------------------------------------------------------


def burn_in_child(seconds):
    """Run a child process that burns ``seconds`` of CPU, and wait for it."""
    import subprocess

    code = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"
    subprocess.run([sys.executable, "-c", code], check=True)


def burn_waited_later(seconds):
    """Start a child that burns ``seconds`` of CPU; a thread waits for it after the job ended."""
    import subprocess

    code = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {seconds}: pass"
    child = subprocess.Popen([sys.executable, "-c", code])
    threading.Thread(target=child.wait, daemon=True).start()


def later(delay, what, *args):
    """Return at once; ``what(*args)`` runs in a thread ``delay`` seconds later (between calls)."""
    import time

    def run():
        time.sleep(delay)
        what(*args)

    threading.Thread(target=run, daemon=True).start()


def write_later(text, delay):
    import subprocess

    subprocess.Popen(["sh", "-c", f"sleep {delay}; echo {text}; echo {text}-err >&2"])


def say(text, pause=0.0):
    import os
    import time

    time.sleep(pause)
    print(text)
    os.write(2, f"{text}-err\n".encode())


def nothing():
    return None


# -- the tests ----------------------------------------------------------------------------


async def test_a_process_started_between_calls_never_writes_into_a_later_job(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, later))
    pool1.add_computation(spec(tmp_path, say, comp_id="say"))
    # Its thread starts a child 0.2 s after the job ended; the child writes 0.3 s later, while
    # the next job runs.
    assert (await pool1.run(job(0.2, write_later, "stray", 0.3))).status == "finished"
    await asyncio.sleep(0.3)
    during = await pool1.run(job("mine", 0.5, comp_id="say"))
    after = await pool1.run(job("next", comp_id="say"))
    assert (during.stdout, during.stderr) == (b"mine\n", b"mine-err\n")
    assert (after.stdout, after.stderr) == (b"next\n", b"next-err\n")


async def test_a_jobs_children_reaped_between_calls_are_no_later_jobs_cpu(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, burn_waited_later))
    pool1.add_computation(spec(tmp_path, nothing, comp_id="nothing"))
    await pool1.run(job(comp_id="nothing"))  # loaded now: the next call is a job of it
    # The job's child burns CPU after the job ended; a thread it left behind reaps it.
    first = await pool1.run(job(BURN))
    assert first.status == "finished" and first.cpu_time < BURN / 2
    await asyncio.sleep(BURN * 4)
    second = await pool1.run(job(comp_id="nothing"))
    assert second.status == "finished" and second.cpu_time < BURN / 2, second.cpu_time


async def test_a_cleanups_children_are_no_later_jobs_cpu(pool1, tmp_path):
    pool1.add_computation(spec(tmp_path, nothing, comp_id="first", cleanup=lambda: burn_in_child(BURN)))
    pool1.add_computation(spec(tmp_path, nothing, comp_id="second"))
    assert (await pool1.run(job(comp_id="second"))).status == "finished"  # loaded: the next call is a job
    assert (await pool1.run(job(comp_id="first"))).status == "finished"
    await pool1.remove_computation("first")  # its cleanup runs in the (only) worker
    second = await pool1.run(job(comp_id="second"))
    assert second.status == "finished" and second.cpu_time < BURN / 2, second.cpu_time
    # ... and a job's own children still count.
    pool1.add_computation(spec(tmp_path, burn_in_child, comp_id="burn"))
    own = await pool1.run(job(BURN, comp_id="burn"))
    assert own.status == "finished" and own.cpu_time >= BURN * 0.9, own.cpu_time
