"""The job a user holds: dispy's fields and statuses, with concurrent.futures and asyncio waits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import pickle
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator

import cloudpickle

from . import _userdata
from ._tracebacks import restore as restore_sources
from .errors import JobCancelledError, JobError, JobTerminatedError, NodeLostError, RemoteTraceback, WorkerDiedError

if TYPE_CHECKING:
    from .protocol.messages import JobDone

__all__ = ["JobStatus", "ClusterJob", "apply_report"]


class JobStatus(enum.Enum):
    """dispy's job statuses.

    ``Terminated`` means the job ended with an exception (raised by the computation, its worker
    died, or it ran past its timeout); ``Abandoned`` means its node was lost and it was not
    resubmitted; ``Cancelled`` means the user cancelled it. ``ProvisionalResult``: the running
    job sent an intermediate result (``clusterpy.provisional_result``), now in ``job.result``;
    the job goes on.
    """

    Created = "Created"
    Running = "Running"
    ProvisionalResult = "ProvisionalResult"
    Finished = "Finished"
    Terminated = "Terminated"
    Cancelled = "Cancelled"
    Abandoned = "Abandoned"

    @property
    def done(self) -> bool:
        return self not in (JobStatus.Created, JobStatus.Running, JobStatus.ProvisionalResult)


_ids = itertools.count(1)
# Read per job: an Enum member through its class costs ~100 ns in Python 3.11 (EnumType's
# __getattr__ hook), a module global a tenth of that.
_CREATED, _FINISHED = JobStatus.Created, JobStatus.Finished

# A job's life as the waiting machinery sees it (ClusterJob._state); ``status`` has the detail.
_PENDING, _RUNNING, _ENDED = 0, 1, 2


class JobSync:
    """Completion of one cluster's jobs: one lock shared by all of them, and targeted wake-ups.

    A job ends in the cluster's event-loop thread (:meth:`ClusterJob._end`): its fields are set
    and its state becomes ended under ``lock``. A thread calling ``job()`` on a job that has not
    ended parks on a lock of its own (one per thread, reused: nothing is allocated per wait),
    listed in ``waiting`` under that job; the job's end releases exactly the threads waiting for
    it, at once. So the loop pays nothing for jobs nobody waits on, a waiter is never woken for
    another job, and no ``concurrent.futures.Future`` (a Condition and an RLock, ~1.5 KB) is made
    unless someone asks for one (``job.future``, ``await job``, ``add_done_callback``); once it
    exists, the job's end resolves it too.
    """

    __slots__ = ("lock", "waiting")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiting: dict[ClusterJob, list[threading.Lock]] = {}  # job -> parked threads' locks


#: For jobs that belong to no running cluster (``recover_jobs``).
_DETACHED = JobSync()
_parking = threading.local()


def _park_lock() -> threading.Lock:
    """This thread's parking lock, held (so acquiring it blocks until someone releases it)."""
    lock: threading.Lock | None = getattr(_parking, "lock", None)
    if lock is None:
        lock = _parking.lock = threading.Lock()
        lock.acquire()
    return lock


def _settle(future: concurrent.futures.Future[Any], result: Any, exc: BaseException | None) -> None:
    try:
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    except concurrent.futures.InvalidStateError:  # its holder cancelled it: the job's end stands
        pass


class ClusterJob:
    """One submitted job.

    Calling the job (``job()``) waits for it and returns its result, or raises the remote
    exception (with a :class:`~clusterpy.errors.RemoteTraceback` as ``__cause__``). ``await job``
    does the same in asyncio code. For a program, the result is its exit code.

    Fields (as in dispy): ``id`` (assignable), ``args``, ``kwargs``, ``status``, ``result``,
    ``exception``, ``stdout``, ``stderr``, ``start_time``, ``end_time``, ``ip_addr``, plus
    ``node_id``, ``hostname``, ``cpu_time``, ``exit_code``, ``submit_time``, and ``files``:
    the paths on this machine of the files the job sent back (``clusterpy.send_file``).

    Thread safety: any thread may wait for, cancel or read a job; the cluster's event-loop
    thread alone changes it. Waiting in ``job()`` costs no per-job object (see
    :class:`JobSync`); ``job.future`` makes the job's ``concurrent.futures.Future`` on first use.
    """

    __slots__ = (
        "id", "args", "kwargs", "status", "result", "exception", "stdout", "stderr",
        "start_time", "end_time", "ip_addr", "node_id", "hostname", "cpu_time", "exit_code",
        "submit_time", "_files", "_key", "_fut", "_cluster", "_sync", "_state", "_queued", "__weakref__",
    )

    def __init__(self, cluster: Any, args: tuple[Any, ...], kwargs: dict[str, Any], submit_time: float) -> None:
        number = next(_ids)
        self._key = str(number)
        self.id: Any = number
        self.args = args
        self.kwargs = kwargs
        self.status = _CREATED
        self.result: Any = None
        self.exception: BaseException | None = None
        self.stdout = ""
        self.stderr = ""
        self.start_time: float | None = None
        self.end_time: float | None = None
        self.ip_addr: str | None = None
        self.node_id: str | None = None
        self.hostname: str | None = None
        self.cpu_time = 0.0
        self.exit_code: int | None = None
        self.submit_time = submit_time
        self._files: list[str] | None = None
        self._fut: concurrent.futures.Future[Any] | None = None
        self._cluster = cluster
        self._sync: JobSync = getattr(cluster, "_sync", None) or _DETACHED
        self._state = _PENDING
        self._queued = False  # counted in its cluster's SubmitQueue (loop thread clears it)

    @property
    def files(self) -> list[str]:
        """Paths on this machine of the files the job sent back (made on first use)."""
        files = self._files
        if files is None:
            files = self._files = []
        return files

    @files.setter
    def files(self, value: list[str]) -> None:
        self._files = value

    def __call__(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result, or raise its exception.

        Raises:
            TimeoutError: the job did not end within ``timeout`` seconds (it keeps running).
            concurrent.futures.CancelledError: its ``future`` was cancelled.
        """
        future = self._fut
        if future is not None:
            return future.result(timeout)
        if self._state != _ENDED:
            self._sleep(timeout)
        if self.exception is not None:
            raise self.exception
        return self.result

    def _sleep(self, timeout: float | None) -> None:
        """Park until the job ends. Raises TimeoutError after ``timeout`` seconds."""
        sync = self._sync
        park = _park_lock()
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            with sync.lock:
                if self._state == _ENDED:
                    return
                sync.waiting.setdefault(self, []).append(park)
            try:
                if end is None:
                    woke = park.acquire()
                else:
                    left = end - time.monotonic()
                    woke = left > 0 and park.acquire(timeout=left)
            except BaseException:  # KeyboardInterrupt in the main thread
                self._unpark(park)
                raise
            if not woke:
                self._unpark(park)
                if self._state == _ENDED:
                    return
                raise TimeoutError(f"job {self.id!r} did not end within {timeout:g} s")

    def _unpark(self, park: threading.Lock) -> None:
        """Withdraw ``park`` from the waiting list; if the job's end took it already, consume
        that release, so that the thread's parking lock is held again."""
        sync = self._sync
        with sync.lock:
            parked = sync.waiting.get(self)
            if parked is not None and park in parked:
                parked.remove(park)
                if not parked:
                    del sync.waiting[self]
                return
        park.acquire()  # _end popped it and releases it (now or in a moment)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        # Shielded so that cancelling the awaiting task does not just drop the concurrent
        # future: the job is cancelled on its node (terminated if it runs), and the task
        # gets its CancelledError.
        future = self.future
        inner = asyncio.wrap_future(future)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # Nobody awaits inner any more: fetch its outcome so asyncio does not log it.
            inner.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not future.done():
                self.cancel()
            raise

    def _future_done(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            try:
                self._cluster.cancel(self)
            except RuntimeError:  # the cluster's loop is gone: nothing left to cancel
                pass

    # ------------------------------------------------------------ the loop thread's side

    def _set_running(self) -> None:
        """The job started on its node (loop thread): its future, if any, becomes running."""
        sync = self._sync
        with sync.lock:
            if self._state != _PENDING:
                return
            self._state = _RUNNING
            future = self._fut
        if future is not None and not future.done() and not future.running():
            future.set_running_or_notify_cancel()  # Future.cancel() now returns False

    def _end(self, status: JobStatus, result: Any = None, exc: BaseException | None = None) -> None:
        """The job ended (loop thread): set its outcome, then wake whoever waits for it."""
        sync = self._sync
        with sync.lock:
            self.status = status
            self.result, self.exception = result, exc
            self._state = _ENDED
            future = self._fut
            parked = sync.waiting.pop(self, None) if sync.waiting else None
        if parked:
            for park in parked:
                park.release()
        if future is not None:
            _settle(future, result, exc)

    # ------------------------------------------------------------ public

    def __reduce__(self) -> Any:
        # Explicit, so that a job among submit()'s arguments is recognised (clusterpy.dataflow).
        raise TypeError(f"a ClusterJob cannot be pickled (job {self.id!r}); pass it to submit() "
                        "to use its result in another job")

    def done(self) -> bool:
        """True once the job ended (or its ``future`` was cancelled)."""
        if self._state == _ENDED:
            return True
        future = self._fut
        return future is not None and future.done()

    def cancel(self) -> bool:
        """Cancel the job (terminating it if it runs); same as ``cluster.cancel(job)``."""
        return bool(self._cluster.cancel(self))

    def add_done_callback(self, fn: Callable[["ClusterJob"], object]) -> None:
        """Call ``fn(job)`` when the job ends (in the cluster's event-loop thread: it must not
        block), or now if it has ended."""
        self.future.add_done_callback(lambda _f: fn(self))

    @property
    def future(self) -> concurrent.futures.Future[Any]:
        """A ``concurrent.futures.Future`` resolved with the job's result or exception (made on
        first use; cancelling it cancels the job)."""
        future = self._fut
        if future is not None:
            return future
        new: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._sync.lock:
            if self._fut is not None:  # another thread made it meanwhile
                return self._fut
            self._fut = new
            # No callback or waiter can be on the new future yet: settling it here, under the
            # lock, orders it with _end and _set_running (which then see it and settle it).
            state = self._state
            if state == _ENDED:
                _settle(new, self.result, self.exception)
            elif state == _RUNNING:
                new.set_running_or_notify_cancel()
        if self._cluster is not None and state != _ENDED:  # future.cancel() cancels the job on its node
            new.add_done_callback(self._future_done)
        return new

    @property
    def _future(self) -> concurrent.futures.Future[Any]:
        """The job's future (older name of :attr:`future`, kept for internal callers)."""
        return self.future

    def __repr__(self) -> str:
        where = f" on {self.ip_addr}" if self.ip_addr else ""
        return f"<ClusterJob id={self.id!r} {self.status.value}{where}>"


def _how_it_died(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def apply_report(job: ClusterJob, msg: "JobDone", *, ip_addr: str, node_id: str, hostname: str,
                 where: str) -> tuple[JobStatus, Any, BaseException | None]:
    """Fill the job's fields from a node's report; return its final status, result and exception.

    The result and exception are unpickled here, on the client, from the worker's bytes.
    """
    job.ip_addr, job.node_id, job.hostname = ip_addr, node_id, hostname
    job.start_time, job.end_time, job.cpu_time = msg.start_time, msg.end_time, msg.cpu_time
    # Any bytes-like: large output arrives as a view. (Most jobs print nothing: no decoding.)
    stdout, stderr = msg.stdout, msg.stderr
    job.stdout = str(stdout, "utf-8", "replace") if stdout else ""
    job.stderr = str(stderr, "utf-8", "replace") if stderr else ""
    job.exit_code = msg.exit_code
    status = msg.status
    if status == "finished":
        result = msg.result
        try:
            if result is None:
                return _FINISHED, None, None
            # (a plain pickle, the common case, without _userdata.loads' call: per job)
            return _FINISHED, pickle.loads(result) if type(result) is bytes else _userdata.loads(result), None
        except Exception as exc:
            return JobStatus.Terminated, None, JobError(
                f"job {job.id!r} finished {where} but its result cannot be unpickled here: {exc!r}")
    if msg.status in ("exception", "setup_failed"):
        error: Any = None
        if msg.exception is not None:
            try:
                error = cloudpickle.loads(msg.exception)
            except Exception:
                error = None
        if not isinstance(error, BaseException):
            prefix = "setup failed: " if msg.status == "setup_failed" else ""
            error = JobError(f"{prefix}{msg.exc_type}: {msg.exc_message}")
        error.__cause__ = RemoteTraceback(f'\n"""\nTraceback {where}:\n{restore_sources(msg.traceback) or ""}"""')
        return JobStatus.Terminated, None, error
    if msg.status == "died":
        return JobStatus.Terminated, None, WorkerDiedError(
            f"the worker process running job {job.id!r} {where} died ({_how_it_died(msg.exit_code)}); "
            "the node replaced it", msg.exit_code)
    if msg.status == "terminated":
        return JobStatus.Terminated, None, JobTerminatedError(msg.exc_message or f"job {job.id!r} was terminated {where}")
    if msg.status == "cancelled":
        return JobStatus.Cancelled, None, JobCancelledError(f"job {job.id!r} was cancelled")
    if msg.status == "abandoned":
        return JobStatus.Abandoned, None, NodeLostError(msg.exc_message or f"job {job.id!r} was abandoned {where}")
    return JobStatus.Terminated, None, JobError(f"job {job.id!r} ended {where} with unknown status {msg.status!r}")
