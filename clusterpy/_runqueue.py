"""The node's run queue: which job runs on which CPU slot of this node, and how its end is reported.

::

    ClientSession (SubmitJobs) -> RunQueue.enqueue: strict FIFO over the node's CPU slots
        -> WorkerPool.try_run (_start): a worker ready for the job takes it at once; no task
           per job: the callback that reads the worker's reply ends it (_ended), which frees
           its slots and starts the next queued job in the same loop turn. WorkerPool.run in a
           task (_run) only when the job must wait for a worker or a computation load
        -> WorkerPool.try_queue when every slot is taken (_queue_behind): the head of the
           queue is written to a worker running a short job of its computation, to start the
           moment that one ends (_turn_came), or given back if the worker exits first
        -> _report: JobDone to the owning session's outbox (_node_reports.Outbox.deliver; marked
           the last of its loop turn when nothing else runs, so it is written at once), or
           kept on disk while its client is away (keep_report)
    CancelJob / timeout -> cancel / _time_out -> WorkerPool.terminate; RecallJobs -> recall

The NodeServer (node.py) owns it: the computations it reports to (``comps``, the node's own
table), the tasks it starts (``spawn``), and whether the node is closing (``closed``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import traceback
from functools import partial
from typing import Callable

from ._node_jobs import QueuedJob
from ._node_reports import KeptResults, job_done_message, keep_report
from .errors import ClusterError
from .pool import JobMessage, JobOutcome, WorkerJob, WorkerPool
from .protocol import messages as m

__all__ = ["RunQueue"]

log = logging.getLogger("clusterpy.node")


class RunQueue:
    """The node's FIFO run queue over its ``cpus`` slots: starts jobs in worker processes,
    cancels, recalls and times them out, and reports their ends to their clients.

    Args:
        node: the node it serves: its computations (a job's report goes to its computation's
            owner; it is dropped once the computation is closed) and its budget for the
            reports it keeps for clients that are away.
        pool: the node's worker processes.
        cpus: the node's CPU slots; a job asking for more takes them all (it runs alone).
        spawn: starts a task the node owns (cancelled and awaited when the node closes).
        closed: set once the node closes: a job a worker gives back is not queued again.
    """

    def __init__(self, node: KeptResults, pool: WorkerPool, cpus: int, *,
                 spawn: Callable[[object], asyncio.Task[object]], closed: asyncio.Event) -> None:
        self.node = node
        self.pool = pool
        self.comps = node.comps  # the node's own table, not a copy
        self.cpus = cpus
        self._spawn = spawn
        self._closed = closed
        self._queue: collections.deque[QueuedJob] = collections.deque()
        self._slots = cpus  # free CPU slots
        self.jobs_done = 0

    @property
    def busy_cpus(self) -> int:
        """The CPU slots that running jobs hold."""
        return self.cpus - self._slots

    @property
    def queued(self) -> int:
        """The jobs waiting: here, or written to a busy worker behind its job."""
        return len(self._queue) + self.pool.queued

    def enqueue(self, job: QueuedJob) -> None:
        """Queue ``job`` behind the others (strict FIFO): it starts at once only if none waits
        ahead of it and its CPU slots are free."""
        # The slots it takes: what it asked for, at most the whole node (then it runs alone).
        # Set once here, so the run queue compares integers. (Not min(max()): the builtins
        # parse keyword arguments, four times the instructions of these comparisons.)
        cpus = job.request.cpus
        job.cpus = 1 if cpus < 1 else self.cpus if cpus > self.cpus else cpus
        if self._queue or job.cpus > self._slots:
            # The head of a non-empty queue needs more slots than are free (slots are freed,
            # and the head leaves, only where _pump runs next), and nothing may pass it: the
            # pump starts nothing, but may write the head to a busy worker (_queue_behind).
            self._queue.append(job)
            self._pump()
            return
        self._slots -= job.cpus
        self._start(job)

    def _pump(self) -> None:
        """Start the queued jobs whose slots are free, in order. Strict FIFO: a job that needs
        more free CPUs than there are waits at the head, so a stream of 1-CPU jobs cannot
        starve it. Called whenever slots are freed or the head of the queue leaves it."""
        while (job := self._head()) is not None:
            if job.cpus > self._slots:
                self._queue_behind()
                break
            self._queue.popleft()
            self._slots -= job.cpus
            self._start(job)

    def _head(self) -> QueuedJob | None:
        """The first job in the queue that was not cancelled (the cancelled ones leave it)."""
        queue = self._queue
        while queue:
            job = queue[0]
            if not job.cancelled:
                return job
            queue.popleft()
        return None

    def _queue_behind(self) -> None:
        """Write the jobs at the head of the queue to busy workers, each to start the moment
        the short job before it ends (WorkerPool.try_queue), so that a stream of short jobs
        does not leave a worker waiting for this process between two of them. Only 1-CPU
        jobs without a timeout (a timeout runs from the start), in queue order."""
        pool = self.pool
        while (job := self._head()) is not None:
            req = job.request
            # can_queue first: what try_queue takes is made only for a job it takes.
            if job.cpus != 1 or (req.timeout is not None and req.timeout > 0) \
                    or not pool.can_queue(job.comp.comp_id) or not self._try_queue(job):
                return
            self._queue.popleft()
            job.behind = True

    def _try_queue(self, job: QueuedJob) -> bool:
        return self.pool.try_queue(WorkerJob(job.key, job.comp.comp_id, job.request.args), partial(self._ended, job),
                                   partial(self._turn_came, job), partial(self._given_back, job),
                                   on_message=partial(self._job_message, job))

    def _turn_came(self, job: QueuedJob) -> None:
        """A job queued behind another on a worker starts: it takes the slot that one frees."""
        job.behind = False
        job.started = True
        self._slots -= job.cpus
        if job.comp.owner is not None:
            job.comp.owner.started(job)

    def _given_back(self, job: QueuedJob) -> None:
        """A job queued behind another on a worker never ran there (the worker exited): it is
        queued first again, or, if cancelled meanwhile, reported so."""
        job.behind = False
        if job.cancelled:
            _end(job)  # it holds no slot
            self._report(job, _cancelled(job))
        elif not self._closed.is_set():
            self._queue.appendleft(job)
            self._pump()

    def _start(self, job: QueuedJob) -> None:
        """Give ``job`` to a worker: at once if one is ready for it (no task: its end is handled
        in the callback that reads the worker's reply, which also starts the next job), else
        through a task that waits for a worker and loads the computation."""
        job.started = True
        req = job.request
        comp = job.comp
        work = WorkerJob(job.key, comp.comp_id, req.args)
        on_message = partial(self._job_message, job)
        try:
            running = self.pool.try_run(work, partial(self._ended, job), on_message=on_message)
        except Exception as exc:
            self._ended(job, _node_failure(job, exc))
            return
        # Once the job is on its way to its worker (it runs meanwhile, which shortens a lone
        # job's round trip): its start noted, its timeout armed.
        if comp.owner is not None:
            comp.owner.started(job)
        if req.timeout is not None and req.timeout > 0:
            job.timer = asyncio.get_running_loop().call_later(req.timeout, self._time_out, job)
        if not running:
            job.task = self._spawn(self._run(job, work, on_message))  # type: ignore[assignment]

    async def _run(self, job: QueuedJob, work: WorkerJob, on_message: Callable[[JobMessage], None]) -> None:
        try:
            outcome = await self.pool.run(work, on_message=on_message)
        except asyncio.CancelledError:
            self._over(job)
            raise
        except Exception as exc:  # the node's own failure (a broken pool): the job still ends, saying why
            outcome = _node_failure(job, exc)
        self._ended(job, outcome)

    def _ended(self, job: QueuedJob, outcome: JobOutcome) -> None:
        """The worker is done with ``job``: free its slots and start what waits for them (the
        next job reaches a worker before this one's report is made), then report it."""
        self._over(job)
        self.jobs_done += 1
        self._report(job, outcome)

    def _over(self, job: QueuedJob) -> None:
        if not _end(job):
            return
        self._slots += job.cpus
        if self._queue:
            self._pump()

    def ending(self, job: QueuedJob) -> asyncio.Future[None]:
        """A future resolved once a started job is over."""
        if job.ended is None:
            job.ended = asyncio.get_running_loop().create_future()
            if job.done:
                job.ended.set_result(None)
        return job.ended

    def _job_message(self, job: QueuedJob, msg: JobMessage) -> None:
        """Forward a provisional result or a file piece to the job's client, in order (dropped
        while the client is away: only final results are kept for its return)."""
        owner = job.comp.owner
        if owner is None or owner.conn.closed or self.comps.get(job.comp.comp_id) is not job.comp:
            return
        req = job.request
        if msg.kind == "progress":
            assert msg.value is not None
            owner.deliver(m.JobProgress(job.comp.comp_id, req.job_id, req.attempt, msg.value))
        else:
            owner.deliver(m.JobFile(job.comp.comp_id, req.job_id, req.attempt, msg.name, msg.data, msg.last, msg.error))

    def _time_out(self, job: QueuedJob) -> None:
        job.timed_out = True
        self._spawn(self.pool.terminate(job.key))

    async def cancel(self, job: QueuedJob) -> None:
        """Cancel a queued job at once, or terminate the worker running it."""
        job.cancelled = True
        if not job.started and not job.behind:
            self._dequeue(job)
            self._report(job, _cancelled(job))
        else:
            await self.pool.terminate(job.key)

    def recall(self, job: QueuedJob) -> bool:
        """Take back a job that has not started (the client runs it elsewhere); False if it
        has started, or ended, already."""
        if job.started or job.cancelled or not self._dequeue(job):
            return False
        job.comp.jobs.pop(job.key, None)
        return True

    def _dequeue(self, job: QueuedJob) -> bool:
        """Take a job that has not started out of the run queue; False if it is not there (held
        behind an AddFiles, say). If it was at the head, what waited behind it may start now."""
        queue = self._queue
        if not queue:
            return False
        head = queue[0] is job
        try:
            queue.remove(job)
        except ValueError:
            return False
        if head:
            self._pump()
        return True

    def _report(self, job: QueuedJob, outcome: JobOutcome) -> None:
        """Send the job's JobDone to its client (queued: it goes out at the end of this loop
        turn, with the others), or keep it on disk while the client is away."""
        comp = job.comp
        comp.jobs.pop(job.key, None)
        if self.comps.get(comp.comp_id) is not comp:
            return  # the computation was closed: nobody wants this result
        message = job_done_message(job, outcome)
        owner = comp.owner
        if owner is not None and not owner.conn.closed:
            try:
                # Nothing else in flight (a lone job's round trip): no other report can join
                # this one in this loop turn, so it need not wait for the turn's end.
                owner.deliver(message, job.key, last=self._slots == self.cpus and not self._queue)
                return
            except (ClusterError, OSError):
                pass  # the connection broke just now: kept, as for a client that is away
        keep_report(self.node, owner, message)


def _end(job: QueuedJob) -> bool:
    """Mark ``job`` over (its timer stopped, its waiters told); False if it was already."""
    if job.done:
        return False
    job.done = True
    if job.timer is not None:
        job.timer.cancel()
    if job.ended is not None and not job.ended.done():
        job.ended.set_result(None)
    return True


def _cancelled(job: QueuedJob) -> JobOutcome:
    """The outcome of a job cancelled before it ran."""
    now = time.time()
    return JobOutcome(job.key, "cancelled", None, None, None, None, None, b"", b"", now, now, 0.0, None)


def _node_failure(job: QueuedJob, exc: Exception) -> JobOutcome:
    """The outcome of a job the node could not run (not the job's fault): an exception that
    names the node's error, so that the job ends instead of waiting forever."""
    log.error("job %s could not be run: %r", job.key, exc, exc_info=exc)
    now = time.time()
    return JobOutcome(job.key, "exception", None, None, "NodeError", f"the node could not run the job: {exc!r}",
                      "".join(traceback.format_exception(exc)), b"", b"", now, now, 0.0, None)
