"""The node's pool of persistent worker processes (the asyncio side).

A :class:`WorkerPool` keeps ``cpus`` worker processes (:mod:`clusterpy.worker`) alive. A
worker loads a computation (unpickling it and running its ``setup``) the first time it runs
one of its jobs, and keeps it until :meth:`WorkerPool.remove_computation`. The pool never
unpickles user data: bundles, arguments, results and exceptions stay opaque cloudpickle
``bytes`` here, and the frames from a worker are read with an unpickler that refuses
every class.

Data flow::

    run(job) ──▶ _acquire() ── idle worker (prefers one that has the computation loaded)
                    │            or waits in FIFO order for the next released worker
                    ▼
                 _Worker.call(("load", ...))   only if not loaded yet
                 _Worker.call(("run", ...))  ──▶ stdin pipe ──▶ worker process
                    ▲                                              │
    JobOutcome ◀────┴── future resolved by _WorkerProtocol ◀── stdout pipe (frames)

    try_run(job, on_done) ── the node's way, no task per job: only on an idle worker that has
        the computation loaded (else False: use run()). The reply slot is a _ReplyHook, not a
        future: the callback that reads the reply releases the worker and calls on_done at
        once, which can hand that worker its next job in the same loop turn.

    try_queue(job, on_done, on_start, on_give_back) ── a stream of short jobs: the job is
        written ("next") to a worker running a short job of its computation (QUICK_JOB), at
        most one behind each; the worker starts it the moment the one before ends, without
        waiting for the node's answer to that one's reply. Its _QueuedHook waits in
        _Worker.behind and takes over _Worker.pending then (on_start). terminate() asks the
        worker to skip it ("skip" -> "skipped": ends "cancelled"); a worker that exits first
        gives it back (on_give_back: it never ran).

    process exits ──▶ _WorkerProtocol.connection_lost ──▶ _Worker._finish():
        the outstanding call fails with _WorkerGone → run() returns a "died" (or
        "terminated") outcome with the exit code and the output collected so far, and
        the pool starts a replacement worker.

One worker process as the pool sees it (its pipes, frames and reply slot) is a
:class:`~clusterpy._poolworker._Worker`; the data the pool takes and gives
(:class:`ComputationSpec`, :class:`WorkerJob`, :class:`JobOutcome`, :class:`JobMessage`) is
in :mod:`clusterpy._workjob`, and exported from here.

Every worker is started in a new session, so ``os.killpg(pid, SIGKILL)`` also kills the
processes its jobs started; the group is killed again when the worker exits, so no
orphans survive it. Background tasks (replacing workers, running cleanups) are tracked
and cancelled by :meth:`WorkerPool.aclose`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from ._capture import collect_output, make_capture_dir, output_base, remove_output
from . import _userdata
from ._channel import pipe_size_for
from ._poolworker import EXIT_FLUSH_DELAY, _QueuedHook, _ReplyHook, _Worker, _WorkerGone, _WorkerProtocol, _describe_exit
from ._workjob import ComputationSpec, JobMessage, JobOutcome, WorkerJob, outcome_from_reply
from .errors import ClusterClosedError, ClusterError, ConfigurationError

__all__ = ["ComputationSpec", "WorkerJob", "JobOutcome", "JobMessage", "WorkerPool"]

log = logging.getLogger("clusterpy.pool")

#: Seconds a new worker may take to report ``ready``.
START_TIMEOUT = 30.0
#: Seconds aclose() gives idle workers to run their cleanups before killing them.
CLOSE_GRACE = 2.0
#: Default largest file a job may send back (clusterpy.progress.DEFAULT_MAX_SEND_FILE).
_DEFAULT_MAX_SEND_FILE = 64 * 1024 * 1024
#: Delays before each attempt to start a replacement worker; then the pool is broken.
RESPAWN_DELAYS = (0.0, 0.2, 1.0)
#: try_queue() writes a job behind another only if that one has run for less than this many
#: seconds, and the last QUICK_STREAK jobs of its computation each took less: a job queued
#: behind a slow one would wait for it while another worker may be free.
QUICK_JOB = 0.002
QUICK_STREAK = 8

class WorkerPool:
    """``cpus`` persistent worker processes running the jobs of loaded computations.

    Use ``async with WorkerPool(n) as pool:`` or :meth:`start` / :meth:`aclose`.
    ``env`` is the environment of the worker processes (default: the node's).
    """

    def __init__(self, cpus: int, *, env: dict[str, str] | None = None,
                 job_options: dict[str, Any] | None = None) -> None:
        if not isinstance(cpus, int) or cpus < 1:
            raise ConfigurationError(f"a worker pool needs at least one CPU, not {cpus!r}")
        self.cpus = cpus
        self._env = dict(env) if env is not None else None
        # Passed to every run: "max_file", and the testing aids "slowdown", "fault" (clusterpy.worker).
        self.job_options: dict[str, Any] = dict(job_options or {})
        self.max_send_file: int = int(self.job_options.setdefault("max_file", _DEFAULT_MAX_SEND_FILE))
        self._specs: dict[str, ComputationSpec] = {}
        # Bumped whenever _specs changes: _release looks for stale computations in a worker only
        # if something changed since it last looked (``_Worker.specs_checked``), not per job.
        self._specs_version = 0
        self._workers: set[_Worker] = set()  # every process started and not yet finished
        self._idle: list[_Worker] = []
        self._waiters: deque[asyncio.Future[_Worker]] = deque()
        self._running: dict[str, _Worker] = {}  # job_id -> worker
        # Jobs written behind a running one (try_queue) -> their worker; and the workers that
        # could take one (running a try_run job with nothing behind it), oldest job first.
        self._behind: dict[str, _Worker] = {}
        self._queueable: dict[_Worker, None] = {}
        # comp_id -> how many of its last jobs in a row took under QUICK_JOB.
        self._quick: dict[str, int] = {}
        # Jobs whose run() waits for a worker (one is being replaced), and those of them that
        # terminate() stopped before they got one: they end "terminated" without running.
        self._acquiring: set[str] = set()
        self._stopped: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._capture_dir = ""
        self._pipe_size = pipe_size_for(cpus)
        self._state = "new"  # -> "open" -> "closing" -> "closed"
        self._broken: BaseException | None = None
        self._closed = asyncio.Event()

    @property
    def busy(self) -> int:
        """Workers running a job now (loading its computation included)."""
        return len(self._running)

    @property
    def queued(self) -> int:
        """Jobs written to a busy worker, waiting there for the job before them to end."""
        return len(self._behind)

    @property
    def pids(self) -> list[int]:
        """Process ids of the live workers (for tests and diagnostics)."""
        return sorted(w.pid for w in self._workers)

    async def __aenter__(self) -> WorkerPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the workers and wait until each is ready.

        Raises:
            ClusterError: a worker could not be started (the others are stopped again).
            RuntimeError: the pool was started before.
        """
        if self._state != "new":
            raise RuntimeError("a WorkerPool can be started only once")
        self._state = "open"
        self._capture_dir = make_capture_dir()
        began = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                spawns = [group.create_task(self._spawn()) for _ in range(self.cpus)]
        except BaseException as exc:
            await self.aclose()
            if isinstance(exc, BaseExceptionGroup):
                first = exc.exceptions[0]
                raise ClusterError(f"cannot start the worker processes: {first}") from first
            raise
        for spawn in spawns:
            self._release(spawn.result())
        log.info("%d workers ready in %.3f s", self.cpus, time.monotonic() - began)

    async def aclose(self) -> None:
        """Stop every worker and wait for it: idle workers run their cleanups first (within
        CLOSE_GRACE seconds), busy ones are killed and their run() returns "terminated".
        Pending run() calls raise ClusterClosedError. Idempotent."""
        if self._state == "new":
            self._state = "closed"
            self._closed.set()
        if self._state == "closed":
            return
        if self._state == "closing":
            await self._closed.wait()
            return
        self._state = "closing"
        try:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(ClusterClosedError("the worker pool is closed"))
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            workers = list(self._workers)
            for worker in workers:
                if worker in self._idle:
                    worker.send_exit()
                else:
                    worker.terminating = True
                    worker.kill()
            self._idle.clear()
            if workers:
                await asyncio.wait([w.exited for w in workers], timeout=CLOSE_GRACE)
                for worker in workers:
                    if not worker.exited.done():
                        log.warning("worker %d did not exit within %.1f s; killing it", worker.pid, CLOSE_GRACE)
                        worker.kill()
                await asyncio.wait([w.exited for w in workers], timeout=EXIT_FLUSH_DELAY + 1.0)
        finally:
            for worker in list(self._workers):
                worker.kill()
            self._state = "closed"
            if self._capture_dir:
                shutil.rmtree(self._capture_dir, ignore_errors=True)
            self._closed.set()
            log.info("worker pool closed")

    def add_computation(self, spec: ComputationSpec) -> None:
        """Register a computation; each worker loads it before its first job of it.

        Raises:
            ValueError: the spec is malformed, or another spec has the same comp_id.
        """
        if spec.kind == "function":
            if not isinstance(spec.bundle, (bytes, memoryview)):
                raise ValueError(f"computation {spec.comp_id!r}: kind 'function' needs a bundle")
        elif spec.kind == "program":
            if not spec.program:
                raise ValueError(f"computation {spec.comp_id!r}: kind 'program' needs a program argv")
        else:
            raise ValueError(f"computation {spec.comp_id!r}: unknown kind {spec.kind!r}")
        if not os.path.isabs(spec.workdir):
            raise ValueError(f"computation {spec.comp_id!r}: workdir must be absolute, not {spec.workdir!r}")
        existing = self._specs.get(spec.comp_id)
        if existing is None:
            self._specs[spec.comp_id] = spec
            self._specs_version += 1
        elif existing != spec:
            raise ValueError(f"computation {spec.comp_id!r} is already registered with another spec")

    async def remove_computation(self, comp_id: str) -> None:
        """Forget a computation; idle workers that loaded it run its cleanup now (awaited), busy
        ones right after their current job (not awaited). Unknown ids are ignored."""
        if self._specs.pop(comp_id, None) is None:
            return
        self._specs_version += 1
        self._quick.pop(comp_id, None)
        idle = [w for w in self._idle if comp_id in w.loaded]
        for worker in idle:
            self._idle.remove(worker)
        tasks = [self._start_task(self._unload(worker, [comp_id])) for worker in idle]
        if tasks:
            # The tasks belong to the pool: cancelling this call does not interrupt cleanups.
            await asyncio.wait(tasks)

    async def run(self, job: WorkerJob, *, on_message: Any = None) -> JobOutcome:
        """Run ``job`` on the next idle worker and return its outcome.

        Never raises for the job's own failures: an exception, a failed setup, a worker
        that died or was terminated all come back as a JobOutcome. If the calling task is
        cancelled while the job runs, its worker is killed (and replaced) and
        CancelledError propagates.

        ``on_message(JobMessage)`` is called (in the event loop, in order, before run returns)
        with each provisional result and file piece the job sends (:mod:`clusterpy.progress`);
        files over ``job_options["max_file"]`` end with an ``error`` piece.

        Raises:
            KeyError: the computation is not registered.
            ValueError: a job with this id is already running.
            ClusterClosedError: the pool is closed (or closes while the job waits).
            ClusterError: the pool is broken (replacement workers cannot be started).
            RuntimeError: the pool was not started.
        """
        self._check_open()
        if job.comp_id not in self._specs:
            raise KeyError(f"unknown computation {job.comp_id!r}")
        self._acquiring.add(job.job_id)
        try:
            worker = await self._acquire(job.comp_id)
        except BaseException:
            self._stopped.discard(job.job_id)
            raise
        finally:
            self._acquiring.discard(job.job_id)
        if job.job_id in self._stopped:
            self._stopped.discard(job.job_id)
            self._release(worker)
            now = time.time()
            return JobOutcome(job.job_id, "terminated", None, None, None, "terminated before it started",
                              None, b"", b"", now, now, 0.0, None)
        spec = self._specs.get(job.comp_id)
        if spec is None or job.job_id in self._running:
            self._release(worker)
            if spec is None:
                raise KeyError(f"computation {job.comp_id!r} was removed")
            raise ValueError(f"job {job.job_id!r} is already running")
        self._mark(worker, job, on_message)
        start = time.time()
        try:
            if worker.loaded.get(spec.comp_id) is not spec:
                if spec.comp_id in worker.loaded:  # an older spec under the same id
                    del worker.loaded[spec.comp_id]
                    await worker.call(("unload", spec.comp_id))
                reply = await worker.call(
                    ("load", spec.comp_id, spec.kind, spec.workdir, spec.bundle, spec.program, spec.env),
                    len(spec.bundle or b""),
                )
                worker.loaded[spec.comp_id] = spec
                if reply[2] is not None:
                    log.warning("setup of computation %s failed in worker %d: %s", spec.comp_id, worker.pid, reply[2])
            reply = await worker.call(self._run_message(worker, job), _userdata.size(job.args))
        except _WorkerGone as gone:
            return await self._lost_outcome(worker, job, start, gone.returncode)
        except BaseException:
            # Cancelled (or a bug): the worker's state is unknown, so it is killed; it is
            # replaced when its exit is seen.
            worker.terminating = True
            worker.kill()
            raise
        finally:
            self._unmark(worker, job.job_id)
        self._release(worker)
        outcome = outcome_from_reply(reply[1])
        self._timed(job.comp_id, outcome)
        return outcome

    def try_run(self, job: WorkerJob, on_done: Callable[[JobOutcome], None], *,
                on_message: Callable[[JobMessage], None] | None = None) -> bool:
        """Start ``job`` now, without a task, if an idle worker has its computation loaded
        (the steady state); return False, having done nothing, otherwise (no such worker, the
        pool not open or broken, an unknown computation, the job id already running): call
        :meth:`run` then, which waits for a worker and loads the computation.

        ``on_done(outcome)`` is called exactly once, in the event loop, with what :meth:`run`
        would have returned; for a normal end it runs in the callback that read the reply,
        after the worker is released, so it can start the next job on that worker in the same
        loop turn. An exception it raises is logged. ``on_message`` and :meth:`terminate` work
        as for :meth:`run`; there is no task to cancel: terminate the job instead.
        """
        if self._state != "open" or self._broken is not None or job.job_id in self._running:
            return False
        spec = self._specs.get(job.comp_id)
        if spec is None:
            return False
        for worker in self._idle:
            if worker.loaded.get(job.comp_id) is spec:
                break
        else:
            return False
        self._idle.remove(worker)
        self._mark(worker, job, on_message)
        worker._write(self._run_message(worker, job), _userdata.size(job.args))
        worker.pending = _ReplyHook(self, worker, job, time.time(), on_done)  # type: ignore[assignment]
        self._queueable[worker] = None
        return True

    def can_queue(self, comp_id: str) -> bool:
        """Whether :meth:`try_queue` would take a job of ``comp_id`` now (to call before making
        what it takes; it can still refuse a job whose id already runs or waits)."""
        return self._queue_target(comp_id) is not None

    def _queue_target(self, comp_id: str) -> _Worker | None:
        """The worker a job of ``comp_id`` would be queued behind (see try_queue), if any."""
        queueable = self._queueable
        if not queueable or self._quick.get(comp_id, 0) < QUICK_STREAK or self._state != "open":
            return None
        spec = self._specs.get(comp_id)
        if spec is None:
            return None
        now = time.time()
        for worker in queueable:  # each runs a try_run or try_queue job: its pending is a _ReplyHook
            head = worker.pending
            assert isinstance(head, _ReplyHook)
            if head.job.comp_id == comp_id and now - head.start < QUICK_JOB and not worker.killed \
                    and worker.loaded.get(comp_id) is spec:
                return worker
        return None

    def try_queue(self, job: WorkerJob, on_done: Callable[[JobOutcome], None], on_start: Callable[[], None],
                  on_give_back: Callable[[], None], *,
                  on_message: Callable[[JobMessage], None] | None = None) -> bool:
        """Write ``job`` to a worker that runs a short job of the same computation (started by
        :meth:`try_run` or by this), so that it starts there the moment that one ends, without
        waiting for the node in between; return False, having done nothing, if no worker can
        take it (see :data:`QUICK_JOB`: only behind jobs that are surely short, at most one).

        ``on_start()`` is called when its turn comes (it runs from then on, as if started by
        try_run); ``on_done(outcome)`` as for try_run, after it. If its worker exits before
        its turn, ``on_give_back()`` is called instead and nothing else: it never ran, and the
        caller runs it elsewhere. :meth:`terminate` asks the worker to skip a job still
        waiting (it then ends "cancelled", or, if it had started, as it ended).
        """
        if job.job_id in self._running or job.job_id in self._behind:
            return False
        worker = self._queue_target(job.comp_id)
        if worker is None:
            return False
        del self._queueable[worker]
        worker.behind = _QueuedHook(self, worker, job, on_done, on_start, on_give_back, on_message)
        self._behind[job.job_id] = worker
        worker._write(self._run_message(worker, job, "next"), _userdata.size(job.args))
        return True

    def _mark(self, worker: _Worker, job: WorkerJob, on_message: Callable[[JobMessage], None] | None) -> None:
        self._running[job.job_id] = worker
        worker.job_id = job.job_id
        worker.on_message, worker.file_bytes = on_message, {}

    def _unmark(self, worker: _Worker, job_id: str) -> None:
        self._running.pop(job_id, None)
        worker.job_id = None
        worker.on_message = None

    def _run_message(self, worker: _Worker, job: WorkerJob, command: str = "run") -> tuple[Any, ...]:
        # The options travel only when they changed (the worker keeps the last ones).
        options = None if worker.options == self.job_options else dict(self.job_options)
        if options is not None:
            worker.options = options
        return (command, job.job_id, job.comp_id, job.args, options)

    def _reply_ran(self, hook: _ReplyHook, reply: tuple[Any, ...]) -> None:
        """The reply of a try_run() job arrived: release its worker, then hand on the outcome."""
        worker, job_id = hook.worker, hook.job.job_id
        try:
            if reply[0] == "done":
                outcome = outcome_from_reply(reply[1])
            elif reply[0] == "skipped" and reply[1] == job_id and type(hook) is _QueuedHook and hook.skip_sent:
                outcome = JobOutcome(job_id, "cancelled", None, None, None, "cancelled before it started", None,
                                     b"", b"", hook.start, hook.start, 0.0, None)
            else:
                raise TypeError(f"a {reply[0]!r} reply")
        except Exception:
            # As a frame that does not decode: the worker broke the protocol. Its exit ends
            # the job ("died"), through this same hook.
            log.exception("worker %d sent a malformed reply to job %s; killing it", worker.pid, job_id)
            hook._done = False
            worker.pending = hook  # type: ignore[assignment]
            worker.kill()
            return
        self._unmark(worker, job_id)
        self._timed(hook.job.comp_id, outcome)
        self._queueable.pop(worker, None)
        behind = worker.behind
        if behind is None:
            self._release(worker)
        elif not worker.killed:  # (a killed worker's exit gives it back: it may have begun it)
            worker.behind = None
            self._start_behind(worker, behind)
        _hand_on(hook, outcome)

    def _timed(self, comp_id: str, outcome: JobOutcome) -> None:
        """Count the jobs of ``comp_id`` in a row that were short (see QUICK_JOB)."""
        quick = self._quick
        quick[comp_id] = quick.get(comp_id, 0) + 1 if outcome.end_time - outcome.start_time < QUICK_JOB else 0

    def _start_behind(self, worker: _Worker, hook: _QueuedHook) -> None:
        """The job before ``hook``'s ended: the worker runs it now."""
        del self._behind[hook.job.job_id]
        hook.start = time.time()
        worker.pending = hook  # type: ignore[assignment]
        self._mark(worker, hook.job, hook.on_message)
        self._queueable[worker] = None
        try:
            hook.on_start()
        except Exception:
            log.exception("starting job %s failed", hook.job.job_id)

    def _give_back(self, hook: _QueuedHook) -> None:
        """``hook``'s worker exited before its turn came: it never ran."""
        self._behind.pop(hook.job.job_id, None)
        try:
            hook.on_give_back()
        except Exception:
            log.exception("giving back job %s failed", hook.job.job_id)

    async def _reply_lost(self, hook: _ReplyHook, returncode: int | None) -> None:
        """The worker of a try_run() job exited under it: the outcome run() would return."""
        worker, job = hook.worker, hook.job
        try:
            outcome = await self._lost_outcome(worker, job, hook.start, returncode)
        except BaseException:
            # Cancelled (the pool closes): the job still gets its end, without its output.
            outcome = self._lost_fields(worker, job, hook.start, returncode, b"", b"")
            raise
        finally:
            self._end_lost(hook, outcome)

    def _end_lost(self, hook: _ReplyHook, outcome: JobOutcome) -> None:
        # Only now is the job unmarked: until its output was collected, _worker_exited had
        # to see the worker as busy (an idle one's capture files are removed).
        self._unmark(hook.worker, hook.job.job_id)
        _hand_on(hook, outcome)

    async def terminate(self, job_id: str) -> bool:
        """Kill the worker running ``job_id`` (its run() then returns "terminated"; the
        worker is replaced); a job whose run() still waits for a worker ends "terminated" as
        soon as it gets one, without running. Returns False if no such job is running."""
        worker = self._running.get(job_id)
        if worker is None:
            worker = self._behind.get(job_id)
            if worker is not None:  # waiting behind another job: the worker is asked to skip it
                hook = worker.behind
                if hook is not None and not hook.skip_sent and not worker.exited.done():
                    hook.skip_sent = True
                    worker._write(("skip", job_id))
                return True
            if job_id in self._acquiring:
                self._stopped.add(job_id)
                return True
            return False
        log.info("terminating job %s (worker %d)", job_id, worker.pid)
        worker.terminating = True
        worker.kill()
        return True

    # -- internals ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "new":
            raise RuntimeError("start() the worker pool first")
        if self._state != "open":
            raise ClusterClosedError("the worker pool is closed")
        if self._broken is not None:
            raise self._broken_error()

    def _broken_error(self) -> ClusterError:
        error = ClusterError(f"the worker pool is broken: cannot start worker processes ({self._broken})")
        error.__cause__ = self._broken
        return error

    async def _spawn(self) -> _Worker:
        loop = asyncio.get_running_loop()
        worker = _Worker(self, loop)
        began = time.monotonic()
        await loop.subprocess_exec(
            lambda: _WorkerProtocol(worker),
            sys.executable, "-m", "clusterpy.worker", self._capture_dir, str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
            start_new_session=True, env=self._env,
        )
        assert worker.pending is not None
        try:
            async with asyncio.timeout(START_TIMEOUT):
                message = await worker.pending
        except _WorkerGone as gone:
            raise ClusterError(
                f"worker process {worker.pid} {_describe_exit(gone.returncode)} before it was ready "
                f"(its stderr is the node's; try `{sys.executable} -m clusterpy.worker` by hand)"
            ) from None
        except TimeoutError:
            worker.kill()
            raise ClusterError(f"worker process {worker.pid} was not ready within {START_TIMEOUT} s") from None
        except BaseException:
            worker.kill()
            raise
        if message[0] != "ready":
            worker.kill()
            raise ClusterError(f"worker process {worker.pid} sent {message[0]!r} instead of 'ready'")
        worker.ready = True
        log.debug("worker %d ready in %.3f s", worker.pid, time.monotonic() - began)
        return worker

    def _worker_exited(self, worker: _Worker) -> None:
        self._workers.discard(worker)
        self._queueable.pop(worker, None)
        if worker.job_id is None and self._capture_dir:
            # Nobody collects its output (a run() whose worker died does, and removes the files).
            remove_output(output_base(self._capture_dir, worker.pid))
        if worker in self._idle:
            self._idle.remove(worker)
        if not worker.ready or self._state != "open":
            return  # a failed start is reported by _spawn; a close stops workers on purpose
        level = logging.INFO if worker.terminating else logging.WARNING
        log.log(level, "worker %d %s; starting a replacement", worker.pid, _describe_exit(worker.returncode))
        self._start_task(self._replace())

    async def _replace(self) -> None:
        error: BaseException | None = None
        for delay in RESPAWN_DELAYS:
            await asyncio.sleep(delay)
            try:
                worker = await self._spawn()
            except Exception as exc:
                log.warning("cannot start a replacement worker: %s", exc)
                error = exc
                continue
            self._release(worker)
            return
        assert error is not None
        log.error("the worker pool is broken: %s", error)
        self._broken = error
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(self._broken_error())

    def _start_task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("worker pool task failed", exc_info=task.exception())

    async def _acquire(self, comp_id: str) -> _Worker:
        if self._idle:
            # Prefer a worker that has already run this computation's setup.
            worker = next((w for w in self._idle if comp_id in w.loaded), self._idle[0])
            self._idle.remove(worker)
            return worker
        waiter: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())  # handed over just as we were cancelled
            raise

    def _release(self, worker: _Worker) -> None:
        """Make ``worker`` available: to the first waiter, or the idle list."""
        if worker.exited.done() or worker.killed or self._state != "open":
            return  # dead (or dying) workers are replaced by _worker_exited; aclose() stops the rest
        if worker.specs_checked != self._specs_version:
            # A computation was removed (or replaced) since this worker was last released: it
            # runs the cleanup of those it loaded first. (Checked only then: not per job.)
            stale = [cid for cid, spec in worker.loaded.items() if self._specs.get(cid) is not spec]
            if stale:
                self._start_task(self._unload(worker, stale))
                return
            worker.specs_checked = self._specs_version
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(worker)
                return
        self._idle.append(worker)

    async def _unload(self, worker: _Worker, comp_ids: list[str]) -> None:
        """Run the cleanup of ``comp_ids`` in ``worker`` (taken out of the idle list), then release it."""
        try:
            for comp_id in comp_ids:
                worker.loaded.pop(comp_id, None)
                reply = await worker.call(("unload", comp_id))
                if reply[2] is not None:
                    log.warning("cleanup of computation %s failed in worker %d:\n%s", comp_id, worker.pid, reply[2])
        except _WorkerGone:
            return
        except BaseException:
            worker.kill()
            raise
        self._release(worker)

    async def _lost_outcome(self, worker: _Worker, job: WorkerJob, start: float, returncode: int | None) -> JobOutcome:
        """The outcome of a job whose worker exited under it, with the output it had written."""
        base = output_base(self._capture_dir, worker.pid)
        stdout, stderr = await asyncio.to_thread(collect_output, base)
        return self._lost_fields(worker, job, start, returncode, stdout, stderr)

    @staticmethod
    def _lost_fields(worker: _Worker, job: WorkerJob, start: float, returncode: int | None,
                     stdout: bytes, stderr: bytes) -> JobOutcome:
        if worker.terminating:
            status, exc_type = "terminated", "JobTerminatedError"
            message = f"job {job.job_id} was terminated: its worker process {worker.pid} {_describe_exit(returncode)}"
        else:
            status, exc_type = "died", "WorkerDiedError"
            message = f"the worker process {worker.pid} running job {job.job_id} {_describe_exit(returncode)}"
        return JobOutcome(
            job_id=job.job_id, status=status, result=None, exception=None, exc_type=exc_type,
            exc_message=message, traceback=None, stdout=stdout, stderr=stderr, start_time=start,
            end_time=time.time(), cpu_time=0.0, exit_code=returncode,
        )


def _hand_on(hook: _ReplyHook, outcome: JobOutcome) -> None:
    """Give a try_run() job's outcome to its caller (exactly once; its errors are logged)."""
    try:
        hook.on_done(outcome)
    except Exception:
        log.exception("handling the outcome of job %s failed", hook.job.job_id)
