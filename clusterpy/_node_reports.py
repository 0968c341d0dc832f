"""How a node's messages leave a client session: job reports batched, starts reported late.

::

    run queue (_runqueue.py)
        -> Outbox.started(job)    a job got its slots: reported (JobsStarted) only if it still runs
                                  START_REPORT_DELAY later, else its JobDone says it all
        -> Outbox.deliver(JobDone) held until the connection next writes (its before_flush hook),
                                  then one JobsDone per computation; a large report goes at once,
                                  and so does the last of a turn (nothing else runs on the node)
        -> Outbox.deliver(JobProgress | JobFile)   at once, after what is held
    ClientSession.send(anything else) = Outbox.send: after the held reports (order kept)
    a report the connection no longer takes -> keep_report: on disk for its client's return

Each ClientSession owns one Outbox and exposes its ``send``, ``started`` and ``deliver`` as its
own (bound once: the run queue calls them for every job).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ._node_jobs import Computation, OwnerSession, QueuedJob, job_key
from .errors import ConnectionClosedError
from .pool import JobOutcome
from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection

__all__ = ["Outbox", "KeptResults", "keep_report", "job_done_message", "START_REPORT_DELAY"]

log = logging.getLogger("clusterpy.node")

#: Seconds a job runs before the node reports it started (JobsStarted); shorter jobs are
#: reported by their JobDone alone.
START_REPORT_DELAY = 0.002
# A job this close to the delay counts as due (the timer's clock is not time.time()).
_START_SLACK = 0.0001

# Job reports are held until the connection next writes, and go out as one JobsDone per
# computation (see Outbox.deliver). A report whose data (result and output, counting
# _REPORT_COST for the rest) is _HOLD_MAX bytes or more is not held: it goes at once, alone,
# its large blobs out of band. Held reports leave early once they count _BATCH_BYTES: at most
# 64 of them, their data (all in band) at most ~128 KB.
_HOLD_MAX = 64 * 1024
_BATCH_BYTES = 64 * 1024
_REPORT_COST = 1024


class KeptResults(Protocol):
    """What :func:`keep_report` reads of the node (clusterpy.node.NodeServer): its
    computations and its budget for the results kept for clients that are away."""

    comps: dict[str, Computation]
    max_kept_bytes: int


class Outbox:
    """What one client session sends, in order: the job reports it holds for the next write,
    the jobs it reports started, and anything else (after the held reports).

    Args:
        node: where a report the connection no longer takes is kept (:func:`keep_report`).
        session: the session this is the outbox of (such a report is not handed back to it).
        conn: the session's connection.

    Made in the event loop it runs in.
    """

    def __init__(self, node: KeptResults, session: OwnerSession, conn: Connection) -> None:
        self.node = node
        self.session = session
        self.conn = conn
        # Kept: asyncio.get_running_loop() makes a getpid() system call (it checks for a fork),
        # and started() arms a timer for most jobs.
        self._loop = asyncio.get_running_loop()
        self._started: dict[str, tuple[QueuedJob, float]] = {}  # job key -> (job, its start) not yet reported
        self._start_timer: asyncio.TimerHandle | None = None
        # Reports held for the next write (comp_id -> reports, in the order they came) and
        # what they count against _BATCH_BYTES; see deliver().
        self._reports: dict[str, list[m.JobDone]] = {}
        self._report_bytes = 0

    def send(self, message: object) -> None:
        if self._reports:
            self._send_reports()  # messages leave in the order they were made
        if not self.conn.closed:
            self.conn.send(codec.encode_parts(message))

    def close(self) -> None:
        """The session ends: no more started reports (its timer would only wake the loop)."""
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None

    def started(self, job: QueuedJob) -> None:
        """Report the job as running, START_REPORT_DELAY seconds from now if it is still
        running then: a short job's JobDone says it all (and the client shows it Running
        first), which saves a message each way and a wake-up of the client mid-job."""
        if self.conn.closed:
            return  # the client is away: it learns of the job from its result
        self._started[job.key] = (job, time.time())
        if self._start_timer is None:
            self._start_timer = self._loop.call_later(START_REPORT_DELAY, self._report_started)

    def _report_started(self) -> None:
        self._start_timer = None
        if not self._started or self.conn.closed:
            return
        # With short jobs, the job the timer was set for has ended and the oldest one running
        # now is younger than the delay: wait for that one, without waking the connection's
        # flush for nothing (this timer ticks every START_REPORT_DELAY while jobs stream by).
        _, began = next(iter(self._started.values()))
        wait = began + START_REPORT_DELAY - time.time()
        if wait > _START_SLACK:
            self._start_timer = self._loop.call_later(wait, self._report_started)
            return
        self.conn.before_flush(self._flush_started)  # with whatever else goes out this turn

    def _flush_started(self, everything: bool = False) -> None:
        """Report the jobs that have run START_REPORT_DELAY seconds (``everything``: all the
        jobs running), oldest first; the timer is armed again for the rest. Jobs that ended
        already were taken out by deliver(): their JobDone went out first."""
        now = time.time()
        # Entries are in start order.
        cutoff = now if everything else now - START_REPORT_DELAY + _START_SLACK
        due: list[str] = []
        by_comp: dict[str, list[m.JobStart]] = {}
        for key, (job, began) in self._started.items():
            if began > cutoff:
                if self._start_timer is None and not self.conn.closed:
                    self._start_timer = self._loop.call_later(
                        began + START_REPORT_DELAY - now, self._report_started)
                break
            due.append(key)
            by_comp.setdefault(job.comp.comp_id, []).append(m.JobStart(job.request.job_id, job.request.attempt, began))
        for key in due:
            del self._started[key]
        for comp_id, starts in by_comp.items():
            self.send(m.JobsStarted(comp_id, tuple(starts)))

    def deliver(self, message: m.JobDone | m.JobProgress | m.JobFile, key: str | None = None, *,
                last: bool = False) -> None:
        """Send a job's message; ``key`` is its job's key, if the caller has it at hand.

        A JobDone with little data is held until the connection next writes (the end of this
        loop turn, or of the read being handled), so that the reports of jobs that end
        meanwhile travel as one JobsDone: one frame to seal, open and decode. Anything else
        this session sends first sends the held reports, so messages keep their order. A held
        report the connection no longer takes when it is sent is kept on disk, as for a client
        that is away (:func:`keep_report`).

        ``last``: the caller knows that no other report can join this one in this loop turn
        (nothing else runs on the node): it is written now, with those held, instead of a
        loop turn later (a lone job's round trip saves that turn). Sent alone, it is kept on
        disk, not raised about, if the connection no longer takes it.

        The caller checks ``conn.closed`` first (a result for a client that is away is kept
        instead), so this sends without checking again.

        Raises:
            ConnectionClosedError: the connection is closed or broken.
        """
        if key is None:
            key = job_key(message.comp_id, message.job_id, message.attempt)
        if type(message) is m.JobDone:
            # Its end carries its start time. With no job left to report, the timer goes too
            # (it would only wake the loop for nothing), once the report is on its way.
            idle = self._started.pop(key, None) is not None and not self._started
            # Inline, not JobDone.data_size: this runs for every job. A view or a tuple is a
            # large result (or one with out-of-band buffers): not held.
            result = message.result
            size = len(message.stdout) + len(message.stderr) + _REPORT_COST
            if result is not None:
                size += len(result) if type(result) is bytes else _HOLD_MAX
            if size >= _HOLD_MAX:
                self._send_at_once(message, now=last)
            elif last and not self._reports:  # alone: nothing to wait for
                self._send_held(message, [message], now=True)
            else:
                self._hold(message, size, last)
            if idle and self._start_timer is not None:
                self._start_timer.cancel()
                self._start_timer = None
            return
        if key in self._started:
            self._flush_started(everything=True)  # Running reaches the client before the job's first message
        self._send_at_once(message)

    def _send_at_once(self, message: m.JobDone | m.JobProgress | m.JobFile, now: bool = False) -> None:
        """Send ``message`` after the held reports (``now``: written at once)."""
        if self._reports:
            self._send_reports()
        self.conn.send(codec.encode_parts(message), now=now)

    def _hold(self, report: m.JobDone, size: int, last: bool) -> None:
        """Hold ``report`` (``size``: what it counts against _BATCH_BYTES) for the next write
        (at once if ``last``)."""
        held = self._reports
        reports = held.get(report.comp_id)
        if reports is None:
            if not held:
                self.conn.before_flush(self._send_reports)  # raises if the connection is closed
            reports = held[report.comp_id] = []
        reports.append(report)
        self._report_bytes += size
        if last:
            self.conn.flush()  # runs _send_reports, the before_flush hook
        elif self._report_bytes >= _BATCH_BYTES:
            self._send_reports()

    def _send_reports(self) -> None:
        """Send the held reports: per computation, one JobsDone (a JobDone if it is one
        report). Runs as the connection's before_flush hook, and before anything else this
        session sends. Never raises (it runs inside the connection's flush): reports the
        connection no longer takes are kept for the client's return."""
        held = self._reports
        if not held:
            return  # sent already, before another message
        self._reports, self._report_bytes = {}, 0
        for comp_id, reports in held.items():
            self._send_held(reports[0] if len(reports) == 1 else m.JobsDone(comp_id, tuple(reports)), reports)

    def _send_held(self, message: m.JobDone | m.JobsDone, reports: list[m.JobDone], now: bool = False) -> None:
        """Send ``message`` (the held ``reports``; ``now``: written at once, with what is
        queued before it); reports the connection no longer takes are kept. Never raises."""
        try:
            self.conn.send(codec.encode_parts(message), now=now)
        except ConnectionClosedError:
            for report in reports:
                keep_report(self.node, self.session, report)
        except ValueError as exc:  # over the frame cap
            if len(reports) == 1:  # lost, as it was unbatched (deliver raised ValueError)
                log.error("the result of job %s/%s cannot be sent: %s", reports[0].comp_id, reports[0].job_id, exc)
                return
            for report in reports:  # together only: one by one
                self._send_held(report, [report])


def keep_report(node: KeptResults, session: OwnerSession | None, message: m.JobDone) -> None:
    """Keep a job's report on disk for its client's return (``session``: the one whose
    connection would not take it), within the node's budget for kept results, as for a client
    that is away; sent instead if its computation has a live session of its own by now; dropped
    if the computation is gone (nobody wants it)."""
    comp = node.comps.get(message.comp_id)
    if comp is None:
        return
    owner = comp.owner
    if owner is not None and owner is not session and not owner.conn.closed:
        try:
            owner.deliver(message)
            return
        except (ConnectionClosedError, OSError):
            pass
    if sum(c.kept_bytes for c in node.comps.values()) + message.data_size > node.max_kept_bytes:
        log.warning("kept-results budget (%d bytes) full: dropping the result of job %s/%s", node.max_kept_bytes,
                    message.comp_id, message.job_id)
        message = message.dropped("node")
    comp.keep(message)


def job_done_message(job: QueuedJob, o: JobOutcome) -> m.JobDone:
    """The report of one job's end, with the node's view of why it was stopped."""
    status, exc_message = o.status, o.exc_message
    if job.timed_out and status == "terminated":
        exc_message = f"the job ran longer than its timeout of {job.request.timeout:g}s and was terminated"
    elif job.cancelled and status in ("terminated", "cancelled"):
        status = "cancelled"
    return m.JobDone(
        job.comp.comp_id, job.request.job_id, job.request.attempt, status, o.result, o.exception,
        o.exc_type, exc_message, o.traceback, o.stdout, o.stderr, o.start_time, o.end_time,
        o.cpu_time, o.exit_code,
    )
