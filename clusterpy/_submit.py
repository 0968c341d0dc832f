"""The bounded hand-off of submissions from user threads to the cluster's event-loop thread.

::

    user threads                          SubmitQueue                         loop thread
    ------------                          -----------                         -----------
    submit() -> admit(timeout) ------->   queued += 1, or wait while
                                          queued >= max_queued
             -> put(item) ------------>   items.append(item); the first
                                          item of a batch wakes the loop ---> drain(): deliver(items)
                                                                                  ...
                                          queued -= n  <--------------------  release(n): n jobs were
                                          (waiters woken at the low-water          dispatched to a node,
                                           mark, or at once by close())            or ended before that

``queued`` counts the jobs submitted and not yet dispatched to a node (nor ended): the work the
client holds because no node can take it yet. Jobs sent to nodes are bounded by the nodes'
CPUs and prefetch, so bounding ``queued`` bounds the client's memory.

Decisions, in one place:

* **Backpressure, not refusal.** At ``max_queued``, ``admit`` blocks (``queue.Queue.put``
  semantics) until the count falls to the *low-water mark*, about a tenth below the bound (at
  most 1,024 jobs), so a blocked submitter wakes once per batch of dispatches rather than
  once per job (the high/low water marks of asyncio's transports). ``timeout=0`` never
  waits; a timeout that passes raises :class:`~clusterpy.errors.QueueFullError`.
* **The loop thread is never blocked.** A submission from the cluster's own event-loop thread
  (a future's done callback) is admitted past the bound: blocking there would stop the very
  dispatching that makes room. Such submissions are paced by the jobs that end, one callback
  per job, so they cannot run away.
* **close() wakes everyone.** Blocked submitters (threads and coroutines) get
  :class:`~clusterpy.errors.ClusterClosedError` at once.
* **One wake-up per batch.** ``put`` wakes the loop (``call_soon_threadsafe``: a write to its
  self-pipe) only for the first item of a batch; a submitter that runs ahead of the loop adds
  to the pending batch for free.
* **The submitter yields to the loop.** A thread submitting in a tight loop holds the GIL; the
  woken loop thread would get it only at the interpreter's switch interval (5 ms), so jobs
  would wait undispatched and nodes idle while a long ``for`` loop submits (5,000 trivial jobs:
  none had run by the end of their submission). Once :data:`PACE` items wait for a drain the
  loop has not run yet, ``put`` blocks until it runs (a blocked thread releases the GIL): the
  loop dispatches, and handles the results that came meanwhile, every ``PACE`` submissions.
  Never in the loop thread or in a coroutine (``submit_async``), which must not block.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from typing import Any, Callable

import cloudpickle

from . import _userdata
from .errors import ClusterClosedError, QueueFullError

__all__ = ["SubmitQueue", "DEFAULT_MAX_QUEUED", "check_max_queued", "check_submit_timeout", "closed_error", "dumps_args"]

log = logging.getLogger("clusterpy.client")

#: Jobs a JobCluster holds waiting for dispatch before submit() blocks (about 100 MB at ~1 KB each).
DEFAULT_MAX_QUEUED = 100_000

#: Items handed to the loop and not drained yet at which a submitting thread waits for the drain.
PACE = 64
#: The longest a submitter waits for a drain (a loop that is stopping never drains).
_PACE_WAIT = 0.05


#: Argument types that plain pickle writes exactly as cloudpickle does (no code, no classes).
_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})


def dumps_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _userdata.Payload:
    """A job's pickled ``(args, kwargs)``: cloudpickle (functions and classes by value where
    they are local), except for plain scalars, which the C pickler writes identically in a
    third of the time (the common case of many small jobs). Large buffers (NumPy arrays,
    large ``bytes``) travel out of band, as they are at this call (:mod:`._userdata`).

    Raises:
        Exception: whatever pickling raises for an unpicklable argument.
    """
    if not kwargs:
        # (A loop, not all()/any() over generators: this runs once per job, mostly with one
        # or two arguments, where the generators cost more than the pickling.)
        large = False
        for a in args:
            kind = type(a)
            if kind not in _PLAIN:
                break
            if kind is bytes and len(a) >= _userdata.MIN_SIZE:
                large = True
        else:
            if not large:
                return pickle.dumps((args, kwargs), protocol=5)
            return _userdata.dumps((args, kwargs), pickle.dumps, snapshot=True)
    return _userdata.dumps((args, kwargs), cloudpickle.dumps, snapshot=True)


def closed_error() -> ClusterClosedError:
    """What a submission to a closed cluster raises."""
    return ClusterClosedError("this cluster is closed; create a new JobCluster to submit jobs")


def check_max_queued(value: Any) -> int | None:
    """``max_queued`` as given, checked: a positive int, or None (no bound).

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_queued must be a positive int or None, not {value!r}")
    return value


def check_submit_timeout(value: Any) -> float | None:
    """``submit_timeout`` as given, checked: seconds >= 0, or None (wait as long as it takes).

    Raises:
        ValueError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"submit_timeout must be a number of seconds >= 0 or None, not {value!r}")
    return float(value)


class SubmitQueue:
    """Admission (at most ``limit`` jobs waiting for dispatch) and the hand-off to the loop.

    Args:
        loop: the cluster's event loop; ``deliver(items)`` runs there with each batch of items,
            in the order they were put.
        limit: the bound (``max_queued``); None: unbounded (``queued`` is still counted).

    Thread-safe: every method may be called from any thread, except ``release`` and
    ``bind_loop_thread``, which the loop thread calls.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[list[Any]], None],
                 limit: int | None) -> None:
        self._loop = loop
        self._deliver = deliver
        self.limit = limit
        # Blocked submitters resume once this few jobs are left (the low-water mark).
        self._resume_at = -1 if limit is None else limit - max(1, min(limit // 10, 1024))
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._queued = 0
        self._submitted = 0  # jobs ever admitted (JobCluster.stats().jobs_submitted)
        self._sleepers = 0  # threads waiting in admit()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._items: list[Any] = []
        self._drain_scheduled = False
        self._drains = 0  # drains so far: a pacing submitter waits for the next one
        self._drained = threading.Condition(self._lock)
        self._closed = False
        self._loop_ident: int | None = None

    def bind_loop_thread(self) -> None:
        """Called once in the loop thread: submissions from it are never blocked."""
        self._loop_ident = threading.get_ident()

    @property
    def queued(self) -> int:
        """Jobs admitted and not yet dispatched to a node (nor ended)."""
        return self._queued

    @property
    def submitted(self) -> int:
        """Jobs admitted since the cluster started."""
        return self._submitted

    # ------------------------------------------------------------ admission (user threads)

    def _full(self) -> bool:  # lock held
        return self.limit is not None and self._queued >= self.limit and threading.get_ident() != self._loop_ident

    def _admit_locked(self) -> None:
        self._queued += 1
        self._submitted += 1

    def _refuse(self, timeout: float) -> QueueFullError:
        waited = "did not wait" if timeout == 0 else f"waited {timeout:g} s"
        return QueueFullError(f"{self._queued} jobs are waiting to be dispatched (max_queued={self.limit}); "
                              f"submit {waited} for room (submit_timeout)")

    def try_admit(self) -> bool:
        """Admit one job if there is room now; never blocks.

        Raises:
            ClusterClosedError: the queue is closed.
        """
        with self._lock:
            if self._closed:
                raise closed_error()
            if self._full():
                return False
            self._admit_locked()
            return True

    def admit(self, timeout: float | None = None) -> None:
        """Admit one job, waiting up to ``timeout`` seconds (None: as long as it takes) for room.

        Raises:
            QueueFullError: still no room after ``timeout``.
            ClusterClosedError: the queue is (or got) closed.
        """
        with self._lock:
            if not self._closed and not self._full():  # the common case: room, no clock read
                self._admit_locked()
                return
            end = None if timeout is None else time.monotonic() + timeout
            self._sleepers += 1
            try:
                while True:
                    if self._closed:
                        raise closed_error()
                    if not self._full():
                        self._admit_locked()
                        return
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise self._refuse(timeout or 0.0)
                    self._room.wait(left)
            finally:
                self._sleepers -= 1

    async def admit_async(self, timeout: float | None = None) -> None:
        """:meth:`admit` for coroutines: awaits room without blocking the caller's event loop.

        Cancelling the awaiting task leaves nothing admitted.

        Raises:
            QueueFullError: still no room after ``timeout``.
            ClusterClosedError: the queue is (or got) closed.
        """
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise closed_error()
                if not self._full():
                    self._admit_locked()
                    return
                if end is not None and loop.time() >= end:
                    raise self._refuse(timeout or 0.0)
                waiter: asyncio.Future[None] = loop.create_future()
                entry = (loop, waiter)
                self._async_waiters.append(entry)
            try:
                if end is None:
                    await waiter
                else:
                    await asyncio.wait_for(waiter, max(0.0, end - loop.time()))
            except TimeoutError:
                pass  # checked at the top of the loop, under the lock
            finally:
                with self._lock:
                    if entry in self._async_waiters:
                        self._async_waiters.remove(entry)

    def release(self, count: int = 1) -> None:
        """``count`` admitted jobs left the queue (dispatched, or ended before that)."""
        with self._lock:
            self._queued -= count
            if self._queued <= self._resume_at and (self._sleepers or self._async_waiters):
                self._wake_all()

    def withdraw(self) -> None:
        """Give back an admission whose job was never submitted (its arguments did not pickle,
        the executor shut down meanwhile): as if it had not been admitted."""
        with self._lock:
            self._submitted -= 1
        self.release(1)

    def _wake_all(self) -> None:  # lock held
        self._room.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(_wake, waiter)
            except RuntimeError:  # that event loop is closed: nobody awaits there any more
                pass

    def close(self) -> None:
        """Admit nothing more; blocked submitters get ClusterClosedError now."""
        with self._lock:
            self._closed = True
            self._wake_all()
            self._drained.notify_all()  # a pacing submitter need not wait for a loop that stops

    # ------------------------------------------------------------ hand-off to the loop

    def put(self, item: Any, on_orphaned: Callable[[list[Any]], None]) -> None:
        """Hand an admitted item to the loop thread (``deliver`` gets it in a batch).

        If the loop is gone (the cluster closed under a submitter that was already admitted),
        every item still pending is given to ``on_orphaned`` (in this thread) instead, and
        ClusterClosedError is raised.
        """
        with self._lock:
            items = self._items
            items.append(item)
            if self._drain_scheduled:
                if len(items) % PACE == 0 and not self._closed and self._may_pace():
                    drains = self._drains
                    self._drained.wait(_PACE_WAIT)  # releases the GIL: the loop thread drains
                    if self._drains == drains:
                        log.debug("submit: the event loop did not drain %d submissions within %gs",
                                  len(self._items), _PACE_WAIT)
                return
            self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                orphans, self._items = self._items, []
                self._drain_scheduled = False
            on_orphaned(orphans)
            raise closed_error() from None

    def _may_pace(self) -> bool:
        """Whether ``put`` may block this thread: not the loop thread, not a coroutine."""
        return threading.get_ident() != self._loop_ident and asyncio._get_running_loop() is None

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._drain_scheduled = False
            self._drains += 1
            if len(items) >= PACE:
                self._drained.notify_all()
        if items:
            self._deliver(items)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
