"""Work that stops early: ``cluster.map(..., stop_when=predicate)`` (needle in a haystack).

::

    consumer thread                            cluster loop thread
    ---------------                            -------------------
    StoppableMap: submits chunks lazily,       each chunk's job ends -> stop_when(value) for each
    at most `window` jobs in flight ------->   of its values; the first that holds: stop = True,
                                               every job of this map not yet ended is cancelled
    yields the values in input order  <-----   (queued: dropped at once; running: terminated on
    (cancelled chunks are left out), then        its node, which reports it cancelled)
    ends once every job it submitted ended

So at most ``window`` jobs past the needle are ever submitted, and when the iterator is
exhausted no job of the map is queued or running anywhere. ``stop_when`` runs in the
cluster's event-loop thread, as results arrive (not in input order): keep it quick.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Generator, Iterable, Iterator, Sequence

from ._remote import PARTIAL_ATTR, Chunk
from .errors import JobCancelledError, JobTerminatedError
from .executor import _window
from .job import ClusterJob, JobStatus
from .progress import DROPPED

if TYPE_CHECKING:
    from .client import JobCluster

__all__ = ["StoppableMap"]


class StoppableMap(Iterator[Any]):
    """The iterator ``cluster.map(..., stop_when=...)`` returns.

    Attributes:
        stopped: True once a value satisfied ``stop_when`` (or the cluster was stopped).
        stopped_by: that value (None if the cluster's ``stop()`` did it).
        jobs_submitted: jobs (chunks) this map submitted.
    """

    def __init__(self, cluster: "JobCluster", iterables: Sequence[Iterable[Any]], *,
                 stop_when: Callable[[Any], Any], chunksize: int = 1, timeout: float | None = None,
                 buffersize: int | None = None) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, not {chunksize!r}")
        if buffersize is not None and (isinstance(buffersize, bool) or not isinstance(buffersize, int) or buffersize < 1):
            raise ValueError(f"buffersize must be a positive int, not {buffersize!r}")
        if not callable(stop_when):
            raise TypeError(f"stop_when must be callable, not {type(stop_when).__name__}")
        self.cluster = cluster
        self.stop_when = stop_when
        self.chunksize = chunksize
        self.window = buffersize or _window(cluster, None)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.stopped = False
        self.stopped_by: Any = None
        self.jobs_submitted = 0
        self._items = zip(*iterables)
        self._position = 0
        self._lock = threading.Lock()
        self._live: set[ClusterJob] = set()  # submitted and not ended
        self._pending: collections.deque[ClusterJob] = collections.deque()
        self._error: BaseException | None = None
        self._generation = cluster._stop_generation
        self._results = self._generate()

    def __next__(self) -> Any:
        return next(self._results)

    def __iter__(self) -> "StoppableMap":
        return self

    def close(self) -> None:
        """Stop early from the consumer's side: cancel what is still pending."""
        self._results.close()

    # ------------------------------------------------------------ consumer thread

    def _is_stopped(self) -> bool:
        if not self.stopped and self.cluster._stop_generation != self._generation:
            self.stopped = True  # cluster.stop() stopped every job, ours included
        return self.stopped

    def _fill(self) -> None:
        while len(self._pending) < self.window:
            with self._lock:
                if self._is_stopped():
                    return
                batch = list(itertools.islice(self._items, self.chunksize))
                if not batch:
                    return
                job = self.cluster.submit_job((Chunk(None, batch, self._position),))
                self._live.add(job)
            self._position += len(batch)
            self.jobs_submitted += 1
            self._pending.append(job)
            job.add_done_callback(self._ended)  # after the lock: it may run right here

    def _generate(self) -> Generator[Any, None, None]:
        try:
            self._fill()
            while self._pending:
                job = self._pending.popleft()
                left = None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
                try:
                    values = job.future.result(left)
                except (JobCancelledError, JobTerminatedError):
                    if self._is_stopped():
                        continue  # cancelled by the stop: left out
                    raise
                except BaseException as exc:
                    partial = exc.__dict__.pop(PARTIAL_ATTR, None) if hasattr(exc, "__dict__") else None
                    if partial:
                        yield from (v for v in partial if v is not DROPPED)
                    raise
                self._fill()
                for value in values:
                    if value is not DROPPED:
                        yield value
            if self._error is not None:
                raise self._error
        finally:
            self._cancel_all()
            for job in self._pending:  # closed early: wait until nothing of ours runs any more
                try:
                    job.future.exception(30)
                except BaseException:  # noqa: BLE001 -- cancelled, or gone: nothing to wait for
                    pass

    # ------------------------------------------------------------ loop thread

    def _ended(self, job: ClusterJob) -> None:
        with self._lock:
            self._live.discard(job)
            if self.stopped or job.status is not JobStatus.Finished:
                return
        try:
            hit = next((v for v in job.result if v is not DROPPED and self.stop_when(v)), DROPPED)
        except BaseException as exc:  # noqa: BLE001 -- raised in the consumer thread instead
            self._error = exc
            hit = None
        if hit is DROPPED:
            return
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            self.stopped_by = hit
        self.cluster._note_stop()
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._lock:
            live = list(self._live)
        for job in live:
            if not job.done():
                self.cluster.cancel(job)
