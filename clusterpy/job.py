"""The job a user holds: dispy's fields and statuses, with concurrent.futures and asyncio waits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import itertools
import signal
from typing import TYPE_CHECKING, Any, Callable, Generator

import cloudpickle

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


class ClusterJob:
    """One submitted job.

    Calling the job (``job()``) waits for it and returns its result, or raises the remote
    exception (with a :class:`~clusterpy.errors.RemoteTraceback` as ``__cause__``). ``await job``
    does the same in asyncio code. For a program, the result is its exit code.

    Fields (as in dispy): ``id`` (assignable), ``args``, ``kwargs``, ``status``, ``result``,
    ``exception``, ``stdout``, ``stderr``, ``start_time``, ``end_time``, ``ip_addr``, plus
    ``node_id``, ``hostname``, ``cpu_time``, ``exit_code``, ``submit_time``, and ``files``:
    the paths on this machine of the files the job sent back (``clusterpy.send_file``).
    """

    __slots__ = (
        "id", "args", "kwargs", "status", "result", "exception", "stdout", "stderr",
        "start_time", "end_time", "ip_addr", "node_id", "hostname", "cpu_time", "exit_code",
        "submit_time", "files", "_key", "_future", "_cluster", "__weakref__",
    )

    def __init__(self, cluster: Any, args: tuple[Any, ...], kwargs: dict[str, Any], submit_time: float) -> None:
        self._key = str(next(_ids))
        self.id: Any = int(self._key)
        self.args = args
        self.kwargs = kwargs
        self.status = JobStatus.Created
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
        self.files: list[str] = []
        self._future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._cluster = cluster
        if cluster is not None:  # future.cancel() (executor users) cancels the job on its node
            self._future.add_done_callback(self._future_done)

    def __call__(self, timeout: float | None = None) -> Any:
        """Wait for the job and return its result, or raise its exception.

        Raises:
            TimeoutError: the job did not end within ``timeout`` seconds (it keeps running).
        """
        return self._future.result(timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        # Shielded so that cancelling the awaiting task does not just drop the concurrent
        # future: the job is cancelled on its node (terminated if it runs), and the task
        # gets its CancelledError.
        inner = asyncio.wrap_future(self._future)
        try:
            return await asyncio.shield(inner)
        except asyncio.CancelledError:
            # Nobody awaits inner any more: fetch its outcome so asyncio does not log it.
            inner.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not self._future.done():
                self.cancel()
            raise

    def _future_done(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            try:
                self._cluster.cancel(self)
            except RuntimeError:  # the cluster's loop is gone: nothing left to cancel
                pass

    def __reduce__(self) -> Any:
        # Explicit, so that a job among submit()'s arguments is recognised (clusterpy.dataflow).
        raise TypeError(f"a ClusterJob cannot be pickled (job {self.id!r}); pass it to submit() "
                        "to use its result in another job")

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Cancel the job (terminating it if it runs); same as ``cluster.cancel(job)``."""
        return bool(self._cluster.cancel(self))

    def add_done_callback(self, fn: Callable[["ClusterJob"], object]) -> None:
        self._future.add_done_callback(lambda _f: fn(self))

    @property
    def future(self) -> concurrent.futures.Future[Any]:
        """A ``concurrent.futures.Future`` resolved with the job's result or exception."""
        return self._future

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
    job.stdout = msg.stdout.decode("utf-8", "replace")
    job.stderr = msg.stderr.decode("utf-8", "replace")
    job.exit_code = msg.exit_code
    if msg.status == "finished":
        try:
            return JobStatus.Finished, cloudpickle.loads(msg.result) if msg.result is not None else None, None
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
