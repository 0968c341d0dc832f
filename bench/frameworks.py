"""One adapter per framework, so that every workload runs the same code against each.

An adapter owns its backend (a node daemon, a local cluster, a process pool) for the whole
benchmark run: :meth:`Framework.start` once, :meth:`Framework.stop` once. A workload opens a
:class:`Session` for one function (clusterpy and dispy deploy one computation per cluster),
submits jobs through it and closes it.

Every backend runs ``cpus`` (2) worker processes on 127.0.0.1. Nothing here installs anything;
an adapter whose package is missing reports why in :attr:`Framework.unavailable`.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

SECRET = "clusterpy-bench-" + os.urandom(8).hex()

# Removed at exit, after dispy's own exit handler (registered later, so run earlier) has
# written its recovery file there.
_LATE_CLEANUP: list[str] = []
atexit.register(lambda: [shutil.rmtree(path, ignore_errors=True) for path in _LATE_CLEANUP])


class NotSupported(Exception):
    """The framework has no such operation (printed as n/a)."""


class Stalled(Exception):
    """A job did not end within :data:`JOB_TIMEOUT`: the framework lost it."""


#: Seconds any single result may take before the framework is declared stalled.
JOB_TIMEOUT = 120.0


def isolated_network() -> bool:
    """True inside a network namespace whose only interface is loopback."""
    # if_nameindex() asks the kernel about this process's namespace; /sys/class/net would
    # show the namespace that mounted /sys.
    try:
        return [name for _, name in socket.if_nameindex()] == ["lo"]
    except OSError:
        return False


def _wait_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


def _stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Session:
    """Jobs of one function on one framework."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.errors = 0  # jobs that ended with an error (the framework's, not the function's)

    def submit(self, *args: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any) -> Any:
        try:
            return handle.result(JOB_TIMEOUT)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise Stalled(f"a job did not end within {JOB_TIMEOUT:g} s") from None

    def gather(self, handles: list[Any]) -> list[Any]:
        return [self.result(h) for h in handles]

    def call(self, *args: Any) -> Any:
        return self.result(self.submit(*args))

    def reset(self) -> None:
        """Forget the previous run's errors (called at the start of each timed run)."""
        self.errors = 0

    def finished_at(self, now: float) -> float:
        """When the last job ended (``time.perf_counter()``); ``now`` unless jobs were lost,
        so that waiting for a lost job does not count as work."""
        return now

    def map(self, args: Iterable[Any], chunksize: int) -> list[Any]:
        raise NotSupported

    def close(self) -> None:
        pass


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, ...)."""
    out, todo = [], _children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo += _children(child)
    return out


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children that it has reaped (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class Framework:
    name = "?"
    #: Why this framework cannot run here (None: it can).
    unavailable: str | None = None

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.own_pids: set[int] = set()

    def launch(self) -> None:
        """:meth:`start`, noting which child processes it started (for :meth:`cpu_seconds`)."""
        before = set(descendants(os.getpid()))
        self.start()
        self.own_pids = set(descendants(os.getpid())) - before

    def cpu_seconds(self) -> float:
        """CPU time so far of this process (every framework's client side lives here; the
        others idle meanwhile) plus this framework's own processes and their descendants."""
        t = os.times()
        pids = set(self.own_pids)
        for pid in self.own_pids:
            pids.update(descendants(pid))
        return t.user + t.system + sum(process_cpu(pid) for pid in pids)

    def start(self) -> None:
        pass

    def open(self, fn: Callable[..., Any]) -> Session:
        raise NotImplementedError

    def stop(self) -> None:
        pass


# ------------------------------------------------------------------------------- clusterpy


class _ClusterpySession(Session):
    def __init__(self, fn: Callable[..., Any], nodes: list[str]) -> None:
        super().__init__(fn)
        from clusterpy.client import JobCluster

        self.cluster = JobCluster(fn, nodes=nodes, secret=SECRET)

    def submit(self, *args: Any) -> Any:
        return self.cluster.submit(*args)

    def result(self, handle: Any) -> Any:
        try:
            return handle(JOB_TIMEOUT)
        except (TimeoutError, concurrent.futures.TimeoutError):
            raise Stalled(f"clusterpy job {handle.id} did not end within {JOB_TIMEOUT:g} s") from None

    def map(self, args: Iterable[Any], chunksize: int) -> list[Any]:
        return list(self.cluster.map(args, chunksize=chunksize))

    def close(self) -> None:
        self.cluster.close(terminate=True, timeout=30)


class Clusterpy(Framework):
    """A real ``clusterpy-node --cpus N`` process on 127.0.0.1; one JobCluster per workload."""

    name = "clusterpy"

    def __init__(self, cpus: int) -> None:
        super().__init__(cpus)
        try:
            import clusterpy  # noqa: F401
        except ImportError as exc:
            self.unavailable = f"cannot import clusterpy: {exc}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""
        self.tmp = ""

    @staticmethod
    def node_command() -> list[str]:
        script = os.path.join(os.path.dirname(sys.executable), "clusterpy-node")
        return [script] if os.path.exists(script) else [sys.executable, "-m", "clusterpy.node"]

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="bench-clusterpy-")
        self.proc = subprocess.Popen(
            [*self.node_command(), "--host", "127.0.0.1", "--port", "0", "--cpus", str(self.cpus),
             "--dest-path", os.path.join(self.tmp, "node"), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, env={**os.environ, "CLUSTERPY_SECRET": SECRET},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        match = re.search(r"listening on ([\d.]+):(\d+)", line)
        if not match:
            _stop_process(self.proc)
            raise RuntimeError(f"clusterpy-node did not start: {line!r}")
        self.address = f"{match[1]}:{match[2]}"

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def open(self, fn: Callable[..., Any]) -> Session:
        return _ClusterpySession(fn, [self.address])

    def stop(self) -> None:
        _stop_process(self.proc)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------ dispy


def dispynode_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "dispynode.py")
    return [sys.executable, script] if os.path.exists(script) else [sys.executable, "-m", "dispy.dispynode"]


def start_dispynode(cpus: int, dest: str) -> subprocess.Popen[bytes]:
    """Start dispynode on 127.0.0.1 (port 9701) and wait until it listens."""
    proc = subprocess.Popen(
        [*dispynode_command(), "-i", "127.0.0.1", "-c", str(cpus), "--clean", "--daemon",
         "--dest_path_prefix", dest],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    try:
        _wait_port("127.0.0.1", 9701, 30)
    except BaseException:
        _stop_process(proc)
        raise
    return proc


#: dispy loses a few very short jobs (see _DispySession): a job with no news for this long,
#: while no other job ended either, is counted as lost.
LOST_AFTER = 10.0


class _DispySession(Session):
    """dispynode 4.15 loses very short jobs: a race in its ``job_request`` (``job_info.proc``
    is already None when it writes the pid file) ends about one in a thousand as Terminated,
    and sometimes leaves the node believing its CPUs are busy, after which it runs nothing
    more. A run in which no job ended for :data:`LOST_AFTER` seconds is cut short: the jobs
    still out are counted in ``errors``, the rate counts the jobs that ended up to the last
    one, and :attr:`stalled` tells the caller to restart the node. (dispy's ``job_status``
    callback cannot help: it checks its argument with ``inspect.getargspec``, which Python
    3.11 no longer has.)"""

    def __init__(self, fn: Callable[..., Any], tmp: str) -> None:
        super().__init__(fn)
        import dispy

        self.dispy = dispy
        self.submitted: list[Any] = []
        self.stalled = False
        self._progress = (0, time.monotonic())  # (jobs ended, when that count was first seen)
        self.cluster = dispy.JobCluster(
            fn, nodes=["127.0.0.1"], host="127.0.0.1", loglevel=logging.WARNING,
            recover_file=os.path.join(tmp, f"recover-{time.monotonic_ns()}"),
        )

    def reset(self) -> None:
        super().reset()
        self.submitted = []
        self._progress = (0, time.monotonic())

    def submit(self, *args: Any) -> Any:
        job = self.cluster.submit(*args)
        self.submitted.append(job)
        return job

    def _no_progress_for(self) -> float:
        ended = sum(1 for job in self.submitted if job.finish.is_set())
        if ended != self._progress[0]:
            self._progress = (ended, time.monotonic())
        return time.monotonic() - self._progress[1]

    def result(self, handle: Any) -> Any:
        while not handle.finish.wait(0 if self.stalled else 1.0):  # dispy's job() has no timeout
            if self.stalled or self._no_progress_for() > LOST_AFTER:
                self.stalled = True
                self.errors += 1
                return None
        if handle.status != self.dispy.DispyJob.Finished:
            self.errors += 1
        return handle.result

    def finished_at(self, now: float) -> float:
        if not self.errors:
            return now
        ends = [job.end_time for job in self.submitted if job.finish.is_set() and job.end_time]
        if not ends:
            raise Stalled("dispy ended none of the jobs")
        return max(ends) + (time.perf_counter() - time.time())  # the node's clock is ours (one machine)

    def close(self) -> None:
        if self.stalled:
            self.cluster.close(timeout=10, terminate=True)
        else:
            self.cluster.close()


class Dispy(Framework):
    """A ``dispynode.py -i 127.0.0.1 -c N`` process; one dispy.JobCluster per workload.

    dispy announces nodes and clients by UDP broadcast on the interfaces it binds to, so it
    runs only inside a network namespace whose one interface is loopback (compare.py makes one).
    """

    name = "dispy"

    def __init__(self, cpus: int) -> None:
        super().__init__(cpus)
        try:
            import dispy  # noqa: F401
        except Exception as exc:  # noqa: BLE001 -- any import failure makes it unavailable
            self.unavailable = f"cannot import dispy: {exc!r}"
        else:
            if not isolated_network():
                self.unavailable = ("dispy broadcasts UDP; run compare.py as root so that it can make "
                                    "a private network namespace (only loopback)")
        self.proc: subprocess.Popen[bytes] | None = None
        self.tmp = ""

    def start(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="bench-dispy-")
        self.proc = start_dispynode(self.cpus, os.path.join(self.tmp, "node"))

    def open(self, fn: Callable[..., Any]) -> Session:
        return _DispySession(fn, self.tmp)

    def stop(self) -> None:
        _stop_process(self.proc)
        if self.tmp:
            _LATE_CLEANUP.append(self.tmp)


# ------------------------------------------------------------------------ dask.distributed


class _DaskSession(Session):
    def __init__(self, fn: Callable[..., Any], client: Any) -> None:
        super().__init__(fn)
        self.client = client

    def submit(self, *args: Any) -> Any:
        return self.client.submit(self.fn, *args, pure=False)

    def gather(self, handles: list[Any]) -> list[Any]:
        from distributed import wait

        if wait(handles, timeout=JOB_TIMEOUT * 5).not_done:
            raise Stalled(f"dask jobs did not end within {JOB_TIMEOUT * 5:g} s")
        return self.client.gather(handles)

    def map(self, args: Iterable[Any], chunksize: int) -> list[Any]:
        # dask's map has no chunks (one task per item): chunk as a dask user would.
        items = list(args)
        chunks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        parts = self.client.gather(self.client.map(_apply_to_chunk, chunks, fn=self.fn, pure=False))
        return [value for part in parts for value in part]


def _apply_to_chunk(chunk: list[Any], fn: Callable[..., Any]) -> list[Any]:
    return [fn(x) for x in chunk]


class Dask(Framework):
    """``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)`` on 127.0.0.1."""

    name = "dask"

    def __init__(self, cpus: int) -> None:
        super().__init__(cpus)
        try:
            import distributed  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            self.unavailable = f"cannot import distributed: {exc!r}"
        self.cluster: Any = None
        self.client: Any = None

    def start(self) -> None:
        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=self.cpus, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None,
                                    silence_logs=logging.ERROR)
        self.client = Client(self.cluster)

    def open(self, fn: Callable[..., Any]) -> Session:
        return _DaskSession(fn, self.client)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


# ------------------------------------------------------- ProcessPoolExecutor and loky


class _ExecutorSession(Session):
    def __init__(self, fn: Callable[..., Any], executor: Any) -> None:
        super().__init__(fn)
        self.executor = executor

    def submit(self, *args: Any) -> Any:
        return self.executor.submit(self.fn, *args)

    def map(self, args: Iterable[Any], chunksize: int) -> list[Any]:
        return list(self.executor.map(self.fn, args, chunksize=chunksize))


class ProcessPool(Framework):
    """``concurrent.futures.ProcessPoolExecutor(N)``: the local bar (no network, no auth)."""

    name = "ppe"

    def __init__(self, cpus: int) -> None:
        super().__init__(cpus)
        self.executor: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        self.executor = concurrent.futures.ProcessPoolExecutor(self.cpus)
        # Start every worker now, not on the first submissions of a timed run.
        list(self.executor.map(abs, range(self.cpus * 4)))

    def open(self, fn: Callable[..., Any]) -> Session:
        return _ExecutorSession(fn, self.executor)

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


class Loky(Framework):
    """``loky.ProcessPoolExecutor(N)`` (joblib's robust pool, cloudpickle-based)."""

    name = "loky"

    def __init__(self, cpus: int) -> None:
        super().__init__(cpus)
        try:
            import loky  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            self.unavailable = f"cannot import loky: {exc!r}"
        self.executor: Any = None

    def start(self) -> None:
        import loky

        self.executor = loky.ProcessPoolExecutor(max_workers=self.cpus)
        list(self.executor.map(abs, range(self.cpus * 4)))

    def open(self, fn: Callable[..., Any]) -> Session:
        return _ExecutorSession(fn, self.executor)

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)


def quick_check(name: str) -> str | None:
    """Why ``name`` cannot run here, without importing it (the runner's import is the real test)."""
    import importlib.util

    package = {"dask": "distributed"}.get(name, name)
    if name != "ppe" and importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    if name == "dispy" and not isolated_network():
        return "dispy broadcasts UDP; run compare.py as root so that it can make a private network namespace (only loopback)"
    return None


FRAMEWORKS: dict[str, type[Framework]] = {
    "clusterpy": Clusterpy,
    "dispy": Dispy,
    "dask": Dask,
    "ppe": ProcessPool,
    "loky": Loky,
}
