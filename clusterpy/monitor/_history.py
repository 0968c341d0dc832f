"""What the monitor remembers about jobs that ended: counts, throughput, latest failures.

Pure bookkeeping, no I/O and no clock: the caller passes ``now`` (monotonic seconds). The
client's ``_Runtime.finish`` and the scheduler's report handling feed one :class:`JobHistory`
each; the monitor reads it when it takes a snapshot. Everything kept is bounded (a ring of
per-second counters, the last N failures, one small tally per node and per computation).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

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
        self.failures: deque[Ended] = deque(maxlen=keep_failures)
        self.throughput = Throughput(window)
        self.max_traceback = max_traceback

    def add(self, ended: Ended, now: float) -> None:
        """Count one ended job (``now``: monotonic seconds, for the throughput ring)."""
        self.counts[ended.status] += 1
        if ended.owner:
            self.owners.setdefault(ended.owner, Counter())[ended.status] += 1
        failed = ended.status in FAILED
        if ended.node is not None:
            tally = self.nodes.get(ended.node)
            if tally is None:
                tally = self.nodes[ended.node] = NodeTally()
            tally.done += 1
            tally.cpu_time += ended.cpu_time
            tally.failures += failed
        self.throughput.add(now)
        if failed:
            tb = ended.traceback
            if tb is not None and len(tb) > self.max_traceback:
                tb = "...\n" + tb[-self.max_traceback:]
                ended = Ended(ended.key, ended.job_id, ended.status, ended.node, ended.cpu_time, ended.when,
                              ended.error, tb, ended.owner)
            self.failures.append(ended)

    def ended(self) -> int:
        return sum(self.counts.values())

    def forget_owner(self, owner: str) -> None:
        """Drop one owner's counts (a computation that closed), so the table stays bounded."""
        self.owners.pop(owner, None)

    def latest_failures(self) -> list[Ended]:
        """The kept failures, newest first."""
        return list(reversed(self.failures))
