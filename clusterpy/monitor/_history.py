"""What the monitor remembers about jobs that ended: counts, throughput, latest failures.

Pure bookkeeping, no I/O and no clock: the caller passes ``now`` (monotonic seconds). The
client's ``_Runtime.finish`` (while a monitor runs) and the scheduler's report handling feed one
:class:`JobHistory` each; the monitor reads it when it takes a snapshot. Everything kept is
bounded (a ring of per-second counters, the last N failures, one small tally per node and per
computation).

Cost per job matters (it runs for every job in the owner's event loop): a job that did not fail
is only counted (:meth:`JobHistory.count`); a failure may be kept as a function that describes it
(:meth:`JobHistory.add_lazy`), called only when a page reads the latest failures, so a run of
many failing jobs formats only the few that are shown.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Callable

__all__ = ["Ended", "JobHistory", "NodeTally", "Throughput", "FAILED", "STATUSES", "status_of_report"]

# dispy's statuses, in the order the page shows them.
STATUSES = ("Created", "Running", "Finished", "Terminated", "Cancelled", "Abandoned")
# Ended statuses that count as failures (a cancel is the user's choice, not a failure).
FAILED = frozenset({"Terminated", "Abandoned"})

# JobDone.status (the worker's words) -> the dispy status a user sees.
_REPORT_STATUS = {
    "finished": "Finished",
    "exception": "Terminated",
    "setup_failed": "Terminated",
    "died": "Terminated",
    "terminated": "Terminated",
    "cancelled": "Cancelled",
    "abandoned": "Abandoned",
}


def status_of_report(status: str) -> str:
    """The dispy status for a node's ``JobDone.status`` (unknown words count as Terminated)."""
    return _REPORT_STATUS.get(status, "Terminated")


@dataclass(frozen=True, slots=True)
class Ended:
    """One job that ended.

    ``key`` is the runtime's own key for the job (what the cancel action takes), ``job_id`` the
    id a user sees, ``status`` a dispy status, ``node`` the node id it ran on (None if it never
    reached one), ``when`` wall-clock seconds. ``error``/``traceback`` are set for failures.
    """

    key: str
    job_id: str
    status: str
    node: str | None
    cpu_time: float
    when: float
    error: str | None = None
    traceback: str | None = None
    owner: str = ""


@dataclass(slots=True)
class NodeTally:
    done: int = 0
    failures: int = 0
    cpu_time: float = 0.0


class Throughput:
    """Jobs ended per second over the last ``window`` seconds: a ring of counters.

    ``add(now)`` counts one completion in the second ``int(now)``; ``series(now)`` returns the
    ``window`` counts ending with the current second, oldest first. Seconds that passed with no
    completion read 0. ``now`` must not go backwards (monotonic clock).
    """

    def __init__(self, window: int = 120) -> None:
        if window < 1:
            raise ValueError("window must be at least one second")
        self.window = window
        self._ring = [0] * window
        self._second: int | None = None  # the newest second the ring holds

    def _advance(self, second: int) -> None:
        if self._second is None:
            self._second = second
            return
        gap = second - self._second
        if gap <= 0:
            return
        for s in range(self._second + 1, self._second + 1 + min(gap, self.window)):
            self._ring[s % self.window] = 0
        self._second = second

    def add(self, now: float, count: int = 1) -> None:
        second = int(now)
        self._advance(second)
        assert self._second is not None
        if second > self._second - self.window:  # a late count older than the window is dropped
            self._ring[second % self.window] += count

    def series(self, now: float) -> list[int]:
        second = int(now)
        self._advance(second)
        return [self._ring[s % self.window] for s in range(second - self.window + 1, second + 1)]


class JobHistory:
    """Counts of ended jobs by status, per node and per owner; throughput; the latest failures.

    Args:
        keep_failures: how many of the most recent failures to keep (with their tracebacks).
        window: seconds of throughput history.
        max_traceback: characters of each traceback kept (the end, where the error is).
    """

    def __init__(self, *, keep_failures: int = 20, window: int = 120, max_traceback: int = 20_000) -> None:
        self.counts: Counter[str] = Counter()
        self.nodes: dict[str, NodeTally] = {}
        self.owners: dict[str, Counter[str]] = {}
        # Ended records, or functions that make them (add_lazy): latest_failures() reads them.
        self.failures: deque[Ended | Callable[[], Ended]] = deque(maxlen=keep_failures)
        self.throughput = Throughput(window)
        self.max_traceback = max_traceback

    def count(self, status: str, node: str | None, cpu_time: float, now: float, owner: str = "") -> None:
        """Count one ended job without keeping a record of it (``now``: monotonic seconds)."""
        self.counts[status] += 1
        if owner:
            self.owners.setdefault(owner, Counter())[status] += 1
        if node is not None:
            tally = self.nodes.get(node)
            if tally is None:
                tally = self.nodes[node] = NodeTally()
            tally.done += 1
            tally.cpu_time += cpu_time
            tally.failures += status in FAILED
        self.throughput.add(now)

    def add(self, ended: Ended, now: float) -> None:
        """Count one ended job and keep it if it failed (``now``: monotonic seconds)."""
        self.count(ended.status, ended.node, ended.cpu_time, now, ended.owner)
        if ended.status in FAILED:
            self.failures.append(self._trimmed(ended))

    def add_lazy(self, status: str, node: str | None, cpu_time: float, now: float,
                 describe: Callable[[], Ended], owner: str = "") -> None:
        """:meth:`count` one ended job; if it failed, keep ``describe``, called to make its
        :class:`Ended` record only if the failure is still among the latest when they are read.
        ``describe`` must be cheap to keep (it holds what it needs, not the whole job)."""
        self.count(status, node, cpu_time, now, owner)
        if status in FAILED:
            self.failures.append(describe)

    def _trimmed(self, ended: Ended) -> Ended:
        tb = ended.traceback
        if tb is not None and len(tb) > self.max_traceback:
            return replace(ended, traceback="...\n" + tb[-self.max_traceback:])
        return ended

    def ended(self) -> int:
        return sum(self.counts.values())

    def forget_owner(self, owner: str) -> None:
        """Drop one owner's counts (a computation that closed), so the table stays bounded."""
        self.owners.pop(owner, None)

    def latest_failures(self) -> list[Ended]:
        """The kept failures, newest first (describing, once, those kept as functions)."""
        failures = self.failures
        for i in range(len(failures)):
            item = failures[i]
            if not isinstance(item, Ended):
                failures[i] = self._trimmed(item())
        return list(reversed(failures))  # type: ignore[arg-type]  # all Ended now
