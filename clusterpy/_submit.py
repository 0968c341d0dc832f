"""The hand-off from user threads to the cluster's event-loop thread: :class:`LoopInbox`, the
one way in for everything they ask of the loop, and :class:`SubmitQueue`, the bounded hand-off
of submissions through it.

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
* **One wake-up per batch.** ``put`` asks the loop (:meth:`LoopInbox.call`) to drain only for
  the first item of a batch; a submitter that runs ahead of the loop adds to the pending batch
  for free.
* **The submitter yields to the loop.** A thread submitting in a tight loop holds the GIL; the
  woken loop thread would get it only at the interpreter's switch interval (5 ms), so jobs
  would wait undispatched and nodes idle while a long ``for`` loop submits (5,000 trivial jobs:
  none had run by the end of their submission). Once :data:`PACE` items wait for a drain the
  loop has not run yet, ``put`` blocks until it runs (a blocked thread releases the GIL): the
  loop dispatches, and handles the results that came meanwhile, every ``PACE`` submissions.
  Never in the loop thread or in a coroutine (``submit_async``), which must not block.

**One inbox, so order holds by construction.** Everything user threads ask of the loop (a
batch of submissions, a cancel, a call, a coroutine, stopping) goes through the cluster's one
:class:`LoopInbox`, a FIFO of calls: a cancel that follows a submission in a thread always
finds the job there, and nobody has to remember to flush anything first. Its wake-up is a byte
on a socket pair of its own, whose reader runs every call queued so far: asyncio's
``call_soon_threadsafe`` would cost a handle and a context copy per call, a write to the
loop's self-pipe, and a self-pipe read that goes on to a second, failing ``recv`` per wake-up
(a lone round trip, ``c.submit(x)()``, pays for a hand-off every time).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import pickle
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Coroutine

import cloudpickle

from . import _userdata
from .errors import ClusterClosedError, QueueFullError

__all__ = ["LoopInbox", "SubmitQueue", "DEFAULT_MAX_QUEUED", "check_max_queued", "check_submit_timeout", "closed_error", "dumps_args"]

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


class LoopInbox:
    """The one way into the cluster's event loop from other threads (see the module's
    docstring): calls run in the loop thread, each once, in the order they were asked.

    Args:
        loop: the event loop, not running in another thread yet (the inbox's reader is
            registered with it here). A closed loop makes a closed inbox.

    :meth:`call` and :meth:`run` are thread-safe and never block; the loop thread may use them
    too (the call then runs in a later loop iteration, as with ``call_soon``). :meth:`close`
    is for the owner, once the loop no longer runs.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        # A wake-up byte is on its way that the reader has not taken yet: calls appended
        # meanwhile need none of their own (a burst of calls costs one write and one read).
        self._woken = False
        self._closed = False
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        try:
            loop.add_reader(self._reader.fileno(), self._run)
        except RuntimeError:  # the loop is closed: nothing would ever run the calls
            self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` in the loop thread after every call asked before it. What it
        raises goes to the loop's exception handler; the calls after it run all the same.

        Raises:
            RuntimeError: the inbox is closed (the loop is gone).
        """
        if self._closed:
            raise RuntimeError("the cluster's event loop is closed")
        self._calls.append((fn, args))
        if not self._woken:  # (two threads may both write a byte: one wake-up finds nothing)
            self._woken = True
            try:
                self._writer.send(b"\0")
            except BlockingIOError:
                pass  # its buffer is full of wake-ups not read yet: the loop is woken already
            except OSError:  # closed by close() meanwhile
                raise RuntimeError("the cluster's event loop is closed") from None

    def run(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """``asyncio.run_coroutine_threadsafe`` through this inbox: ``coro`` starts as a task of
        the loop in order with the calls (:meth:`call`); the returned future gets its outcome,
        and cancelling that future cancels the task.

        Raises:
            RuntimeError: the inbox is closed (``coro`` is closed, never run).
        """
        outcome: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def start() -> None:
            if outcome.cancelled():
                coro.close()
                return
            task = self._loop.create_task(coro)
            task.add_done_callback(lambda _task: _settle_from(outcome, task))

            def cancel_task(_outcome: concurrent.futures.Future[Any]) -> None:  # in the canceller's thread
                if outcome.cancelled():
                    try:
                        self.call(task.cancel)
                    except RuntimeError:  # the loop is gone, and its tasks with it
                        pass

            outcome.add_done_callback(cancel_task)

        try:
            self.call(start)
        except RuntimeError:
            coro.close()
            raise
        return outcome

    def _run(self) -> None:
        # The flag is cleared before the byte is read: a call appended after this writes a
        # byte of its own (whose wake-up may then find nothing to run), never none at all.
        self._woken = False
        try:
            self._reader.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        calls = self._calls
        # Only the calls queued so far: one asked meanwhile waits for the next turn (it woke
        # the loop), so a call that asks for another cannot keep the loop here.
        for _ in range(len(calls)):
            fn, args = calls.popleft()
            try:
                fn(*args)
            except (SystemExit, KeyboardInterrupt):
                if calls:  # the calls left run at the next wake-up, which this asks for
                    with contextlib.suppress(OSError):
                        self._writer.send(b"\0")
                raise
            except BaseException as exc:  # as asyncio does for a failing callback
                self._loop.call_exception_handler({"message": f"Exception in {fn!r}, called through the inbox",
                                                   "exception": exc})

    def close(self) -> None:
        """Take no more calls (:meth:`call` raises from now on) and release the socket pair;
        calls not run yet are dropped. Idempotent."""
        self._closed = True
        if self._reader.fileno() == -1:
            return
        if not self._loop.is_closed():
            self._loop.remove_reader(self._reader.fileno())
        self._reader.close()
        self._writer.close()


def _settle_from(outcome: concurrent.futures.Future[Any], task: asyncio.Task[Any]) -> None:
    """Give ``outcome`` the ended ``task``'s outcome, unless it was cancelled meanwhile."""
    try:
        if task.cancelled():
            outcome.cancel()
        elif task.exception() is not None:
            outcome.set_exception(task.exception())
        else:
            outcome.set_result(task.result())
    except concurrent.futures.InvalidStateError:  # its holder cancelled it first
        pass


class SubmitQueue:
    """Admission (at most ``limit`` jobs waiting for dispatch) and the hand-off to the loop.

    Args:
        inbox: the way into the cluster's event loop; ``deliver(items)`` runs there with each
            batch of items, in the order they were put.
        limit: the bound (``max_queued``); None: unbounded (``queued`` is still counted).

    Thread-safe: every method may be called from any thread, except ``release`` and
    ``bind_loop_thread``, which the loop thread calls.
    """

    def __init__(self, inbox: LoopInbox, deliver: Callable[[list[Any]], None], limit: int | None) -> None:
        self._inbox = inbox
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
            self._inbox.call(self._drain)
        except RuntimeError:  # the inbox is closed: the loop is gone
            self.abandon(on_orphaned)
            raise closed_error() from None

    def abandon(self, on_orphaned: Callable[[list[Any]], None]) -> None:
        """The loop is gone (its inbox closed): give the items it will never drain to
        ``on_orphaned`` (in this thread). A later ``put`` finds the inbox closed and orphans
        its item too, so none is left behind a drain that never comes."""
        with self._lock:
            orphans, self._items = self._items, []
            self._drain_scheduled = False
        if orphans:
            on_orphaned(orphans)

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
