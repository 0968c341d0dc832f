"""A ``concurrent.futures.Executor`` on the cluster, ordered lazy ``map`` with chunks, and
asyncio helpers (``as_completed``, ``gather``).

::

    executor.submit(fn, *args)                     cluster.map(xs, chunksize=k)
      -> cluster.submit_job((Call(fn), *args))       -> jobs of Chunk(None, k items)
      -> job.future (a real concurrent Future)       -> results in order, flattened
                 |                                              |
    worker: Call rebuilds fn from its per-worker cache (content hash), calls fn(*args);
            Chunk calls the function (or the computation) on each item in turn.

``ClusterExecutor(nodes=..., local=..., ...)`` owns a cluster whose computation only applies
shipped functions; ``cluster.executor()`` borrows an existing cluster (any computation), and
its ``shutdown`` leaves the cluster open.

Futures follow the ``concurrent.futures`` contract: ``wait``, ``as_completed``,
``add_done_callback``, ``cancel`` and ``asyncio.wrap_future`` work as with a process pool.
A future is *running* once its node reports the job started; ``cancel()`` on a pending
future drops the job (also from its node's queue), as ``ProcessPoolExecutor`` does. Remote
exceptions re-raise with a :class:`~clusterpy.errors.RemoteTraceback` as ``__cause__``. Done
callbacks run in the cluster's event-loop thread: they must not block (a ``submit`` there is
never held back by ``max_queued``, since blocking it would stop the dispatching that makes room).

Backpressure: ``submit`` blocks while the cluster holds ``max_queued`` jobs that wait for a node
(the cluster's ``submit_timeout`` bounds the wait); ``map`` submits at most ``buffersize`` jobs
ahead of the results consumed, so it is bounded by both.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterable, Iterator, Sequence

from ._remote import PARTIAL_ATTR, Call, Chunk, apply
from .core.scheduler import MAX_AHEAD
from .job import ClusterJob

if TYPE_CHECKING:
    from .client import JobCluster

__all__ = ["ClusterExecutor", "map_computation", "as_completed", "gather"]

#: Jobs (chunks) in flight per map when ``buffersize`` is not given: enough to keep this many
#: CPUs busy with prefetch, at least this many.
_MIN_WINDOW = 16

_Submit = Callable[[list[tuple[Any, ...]], int], concurrent.futures.Future[Any]]


def _window(cluster: "JobCluster", buffersize: int | None) -> int:
    if buffersize is not None:
        if isinstance(buffersize, bool) or not isinstance(buffersize, int) or buffersize < 1:
            raise ValueError(f"buffersize must be a positive int, not {buffersize!r}")
        return buffersize
    cpus = sum(n["cpus"] for n in cluster.nodes())
    ahead = MAX_AHEAD if cluster.prefetch is None else cluster.prefetch  # adaptive: up to MAX_AHEAD
    return max(_MIN_WINDOW, 2 * cpus * (1 + ahead))


def _ordered_results(submit: _Submit, iterables: Sequence[Iterable[Any]], *, chunksize: int,
                     timeout: float | None, window: int, chunked: bool) -> Iterator[Any]:
    """Submit ``chunksize`` items per job, at most ``window`` jobs in flight; the first window
    is submitted now, the rest as results are consumed. Returns the iterator of results in
    order, with ``Executor.map``'s timeout and cancel-the-rest-on-exit behaviour."""
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
    end = None if timeout is None else time.monotonic() + timeout
    items = zip(*iterables)
    pending: collections.deque[concurrent.futures.Future[Any]] = collections.deque()
    position = 0

    def fill() -> None:
        nonlocal position
        while len(pending) < window:
            batch = list(itertools.islice(items, chunksize))
            if not batch:
                return
            pending.append(submit(batch, position))
            position += len(batch)

    fill()
    return _drain(pending, fill, end, chunked)


def _drain(pending: collections.deque[concurrent.futures.Future[Any]], fill: Callable[[], None],
           end: float | None, chunked: bool) -> Iterator[Any]:
    try:
        while pending:
            future = pending.popleft()
            try:
                values = future.result(None if end is None else end - time.monotonic())
            except BaseException as exc:
                future.cancel()  # as Executor.map: on a timeout the waited-for call is dropped too
                partial = exc.__dict__.pop(PARTIAL_ATTR, None) if chunked and hasattr(exc, "__dict__") else None
                if partial:
                    yield from partial  # the items of the chunk before the failing one
                raise
            fill()
            if chunked:
                yield from values
            else:
                yield values
    finally:
        for future in pending:
            future.cancel()


def map_computation(cluster: "JobCluster", iterables: Sequence[Iterable[Any]], *, chunksize: int = 1,
                    timeout: float | None = None, buffersize: int | None = None) -> Iterator[Any]:
    """Implementation of :meth:`JobCluster.map`: the cluster's computation on each item."""
    if not iterables:
        raise TypeError("map() needs at least one iterable")

    def submit(batch: list[tuple[Any, ...]], start: int) -> concurrent.futures.Future[Any]:
        return cluster.submit_job((Chunk(None, batch, start),)).future

    return _ordered_results(submit, iterables, chunksize=chunksize, timeout=timeout,
                            window=_window(cluster, buffersize), chunked=True)


class ClusterExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures.Executor`` whose calls run on a clusterpy cluster.

    Args:
        nodes: node addresses, as for :class:`~clusterpy.JobCluster`.
        max_workers: with no ``nodes`` and no ``local``, start the embedded local node with
            this many worker processes (so ``ClusterExecutor(4)`` is a drop-in for
            ``ProcessPoolExecutor(4)``).
        **cluster_options: any other :class:`~clusterpy.JobCluster` option (``local``,
            ``local_cpus``, ``depends``, ``setup``, ``secret``, ``timeout``...).

    The executor owns its cluster: ``shutdown`` closes it. Use ``cluster.executor()`` to run
    functions on an existing cluster instead.

    Raises:
        ConfigurationError: as JobCluster does.
    """

    def __init__(self, nodes: Iterable[str] | str | None = None, max_workers: int | None = None,
                 **cluster_options: Any) -> None:
        from .client import JobCluster

        if max_workers is not None:
            if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
                raise ValueError("max_workers must be greater than 0")
            if nodes is None and "local" not in cluster_options:
                cluster_options.update(local=True, local_cpus=max_workers)
        self._init(JobCluster(apply, nodes, **cluster_options), owns=True)

    @classmethod
    def _borrow(cls, cluster: "JobCluster") -> "ClusterExecutor":
        executor = cls.__new__(cls)
        executor._init(cluster, owns=False)
        return executor

    def _init(self, cluster: "JobCluster", *, owns: bool) -> None:
        self._cluster = cluster
        self._owns = owns
        self._lock = threading.Lock()
        self._shutdown = False
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._closer: threading.Thread | None = None

    @property
    def cluster(self) -> "JobCluster":
        """The cluster the calls run on."""
        return self._cluster

    def _track(self, future: concurrent.futures.Future[Any]) -> concurrent.futures.Future[Any]:
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the cluster; returns its ``concurrent.futures.Future``.

        Jobs and futures among the arguments are replaced by their results first
        (:mod:`clusterpy.dataflow`).

        Blocks while the cluster holds ``max_queued`` jobs waiting for dispatch (see
        :class:`~clusterpy.JobCluster`), up to its ``submit_timeout``.

        Raises:
            RuntimeError: after :meth:`shutdown` (also to a call blocked when it happens).
            ClusterError: the arguments cannot be pickled, or the cluster is closed.
            QueueFullError: the cluster's ``submit_timeout`` passed with no room.
        """
        return self._submit_job((Call(fn), *args), kwargs)

    def _submit_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> concurrent.futures.Future[Any]:
        # As a process pool does, submit under the lock that shutdown() takes, so that no call
        # slips in after it; but when the cluster holds max_queued jobs, wait for room with
        # the lock released, so that shutdown() (from any thread) is never held up by it.
        cluster = self._cluster
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if cluster._queue.try_admit():
                return self._track(cluster._submit_admitted(args, kwargs).future)
        cluster._queue.admit(cluster.submit_timeout)  # QueueFullError, ClusterClosedError
        with self._lock:
            if self._shutdown:
                cluster._queue.withdraw()
                raise RuntimeError("cannot schedule new futures after shutdown")
            return self._track(cluster._submit_admitted(args, kwargs).future)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:
        """``fn`` applied to the items of ``iterables``, results in order, like ``Executor.map``.

        ``chunksize`` items go in one job. The iterables are consumed lazily: at most
        ``buffersize`` jobs are in flight (default: enough to keep the cluster's CPUs busy).
        ``timeout`` counts from this call; when it passes, or when an item raises, the
        iterator raises that and the jobs still pending are cancelled. An item that raised
        in a chunk carries a note with its index and value, and the results of the items
        before it are yielded first.

        Raises:
            RuntimeError: after :meth:`shutdown`.
            ValueError: ``chunksize`` or ``buffersize`` below 1.
        """
        call = Call(fn)  # pickled once for the whole map
        if chunksize == 1:
            def submit(batch: list[tuple[Any, ...]], start: int) -> concurrent.futures.Future[Any]:
                return self._submit_job((call, *batch[0]), {})
        else:
            def submit(batch: list[tuple[Any, ...]], start: int) -> concurrent.futures.Future[Any]:
                return self._submit_job((Chunk(call, batch, start),), {})
        return _ordered_results(submit, iterables, chunksize=chunksize, timeout=timeout,
                                window=_window(self._cluster, buffersize), chunked=chunksize != 1)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new calls; with ``cancel_futures``, cancel the calls that have not started.

        ``wait``: return once every call has ended (an owned cluster is then closed);
        otherwise return at once (an owned cluster closes in the background once its calls
        have ended). A borrowed cluster (``cluster.executor()``) stays open.
        """
        with self._lock:
            self._shutdown = True
            pending = self._pending.copy()
        if cancel_futures:
            for future in pending:
                future.cancel()
        if self._owns:
            if wait:
                if self._closer is not None:
                    self._closer.join()
                self._cluster.close()
            elif self._closer is None and not self._cluster._closed:
                # Not a daemon: like a process pool, pending calls finish before the interpreter exits.
                self._closer = threading.Thread(target=self._cluster.close, name="clusterpy-executor-shutdown")
                self._closer.start()
        elif wait:
            concurrent.futures.wait(pending)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "running"
        return f"<ClusterExecutor {state} on {self._cluster.computation_name!r} ({len(self._pending)} pending)>"


# -------------------------------------------------------------------- waiting for many jobs


class _AsCompleted:
    """Jobs (or futures) in the order they end; iterate with ``for`` or ``async for``."""

    def __init__(self, jobs: Iterable[Any], timeout: float | None) -> None:
        self._jobs = list(dict.fromkeys(jobs))  # distinct, in the given order
        self._timeout = timeout

    @staticmethod
    def _future(job: Any) -> concurrent.futures.Future[Any]:
        if isinstance(job, ClusterJob):
            return job.future
        if isinstance(job, concurrent.futures.Future):
            return job
        raise TypeError(f"as_completed takes ClusterJobs or concurrent futures, not {type(job).__name__}")

    def __iter__(self) -> Iterator[Any]:
        by_future = {self._future(job): job for job in self._jobs}
        for future in concurrent.futures.as_completed(by_future, self._timeout):
            yield by_future[future]

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        done: asyncio.Queue[Any] = asyncio.Queue()
        end = None if self._timeout is None else loop.time() + self._timeout

        def on_done(job: Any) -> Callable[[concurrent.futures.Future[Any]], None]:
            def callback(_future: concurrent.futures.Future[Any]) -> None:
                try:
                    loop.call_soon_threadsafe(done.put_nowait, job)
                except RuntimeError:  # our loop has closed: nobody is iterating any more
                    pass
            return callback

        for job in self._jobs:
            self._future(job).add_done_callback(on_done(job))
        for count in range(len(self._jobs)):
            remaining = None if end is None else end - loop.time()
            try:
                yield await asyncio.wait_for(done.get(), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                raise TimeoutError(f"{len(self._jobs) - count} (of {len(self._jobs)}) jobs unfinished") from None


def as_completed(jobs: Iterable[Any], timeout: float | None = None) -> _AsCompleted:
    """Implementation of :meth:`JobCluster.as_completed`."""
    return _AsCompleted(jobs, timeout)


async def gather(jobs: Iterable[Any], *, return_exceptions: bool = False) -> list[Any]:
    """Implementation of :meth:`JobCluster.gather`: ``asyncio.gather`` for jobs.

    Cancelling the awaiting task cancels every job that has not ended (on its node too)."""
    jobs = list(jobs)
    futures = [_AsCompleted._future(job) for job in jobs]
    inner = [asyncio.wrap_future(f) for f in futures]
    try:
        return await asyncio.gather(*map(asyncio.shield, inner), return_exceptions=return_exceptions)
    except asyncio.CancelledError:
        for job, future, waiter in zip(jobs, futures, inner):
            # Nobody awaits these any more: fetch their outcome so asyncio does not log it.
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
            if not future.done():
                job.cancel()
        raise
