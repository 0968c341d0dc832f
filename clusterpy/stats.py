"""``cluster.stats()``: what happened, per node and per job, as plain data that writes to JSON.

The client's event loop feeds a :class:`StatsRecorder` as jobs are dispatched, report and end;
``stats()`` takes a :class:`ClusterStats` snapshot of it (plus what the scheduling and trust
cores know about each node: speed score, observed job time, trust). Items are also readable as
``stats["jobs_done"]`` / ``stats["nodes"][0]["cpus"]`` (the dictionary shape of earlier
versions).

Times are seconds; ``*_time`` fields are Unix times (node clocks for a job's start and end);
``bytes_*`` count the pickled arguments sent and the results, output and files received.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import _userdata

__all__ = ["ClusterStats", "NodeStats", "JobStats", "StatsRecorder", "collect"]


class _Items:
    """``obj["field"]`` reads ``obj.field`` (the dict shape ``stats()`` used to return)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str) or key not in {f.name for f in fields(self)}:  # type: ignore[arg-type]
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


@dataclass(slots=True)
class NodeStats(_Items):
    """One node as this client saw it.

    ``score``: its start-up benchmark score; ``speed``: the score corrected by the job times
    observed (what the scheduler ranks free nodes by); ``observed_job_time``: its typical job
    duration (None before its first job). ``trusted`` is False once it returned a result that
    failed verification or disagreed with a majority (``distrust_reason`` says which); it then
    gets no more jobs. ``verified`` / ``failed_verification``: its results checked by ``verify``;
    ``agreed`` / ``disagreed``: its replicas compared with the majority.
    """

    node_id: str
    name: str
    hostname: str
    ip_addr: str
    cpus: int
    connected: bool
    busy: int = 0
    score: float = 1.0
    speed: float = 1.0
    observed_job_time: float | None = None
    jobs_sent: int = 0
    jobs_done: int = 0
    cpu_time: float = 0.0
    job_time: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    files_received: int = 0
    provisional_results: int = 0
    verified: int = 0
    failed_verification: int = 0
    agreed: int = 0
    disagreed: int = 0
    trusted: bool = True
    distrust_reason: str | None = None


@dataclass(slots=True)
class JobStats(_Items):
    """One job (as the user submitted it). ``runs``: times it was sent to a node (replicas,
    re-runs after a failed verification, resubmissions after a lost node); ``verification``:
    ``None`` (no check asked), ``"unchecked"``, ``"verified"``, ``"voted k/n"``, ``"failed"``
    or ``"lost"``."""

    job_id: str
    status: str = "Created"
    node_id: str | None = None
    submit_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    runs: int = 0
    verification: str | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    files: int = 0
    provisional_results: int = 0


@dataclass(slots=True)
class ClusterStats(_Items):
    """A snapshot of a cluster's statistics (``cluster.stats()``)."""

    computation: str
    jobs_submitted: int
    jobs_done: int
    cpu_time: float
    elapsed: float
    stops: int = 0
    untrusted_nodes: list[str] = field(default_factory=list)
    nodes: list[NodeStats] = field(default_factory=list)
    jobs: list[JobStats] = field(default_factory=list)

    def node(self, node_id: str) -> NodeStats:
        """The stats of one node (by node id, address or host name). Raises KeyError."""
        for n in self.nodes:
            if node_id in (n.node_id, n.name, n.hostname):
                return n
        raise KeyError(node_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def status_table(self) -> str:
        """Per node: CPUs, jobs done and CPU time, then the totals (``print_status``'s text)."""
        lines = ["", f"{'Node':<28} {'Address':<22} {'CPUs':>4} {'Jobs':>7} {'CPU sec':>9} {'Sec/Job':>8}", "-" * 83]
        for n in self.nodes:
            per = n.cpu_time / n.jobs_done if n.jobs_done else 0.0
            lines.append(f"{n.hostname[:28]:<28} {n.name[:22]:<22} {n.cpus:>4} {n.jobs_done:>7} {n.cpu_time:>9.3f} {per:>8.3f}")
        lines += ["-" * 83, f"Total: {self.jobs_done} of {self.jobs_submitted} jobs done, {self.cpu_time:.3f} CPU seconds", ""]
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike[str] | None = None, *, indent: int | None = 2) -> str:
        """The statistics as JSON text; also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=indent, default=str)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text


@dataclass(slots=True)
class _NodeCounters:
    jobs_sent: int = 0
    jobs_done: int = 0
    cpu_time: float = 0.0
    job_time: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    files_received: int = 0
    provisional_results: int = 0


# A job's record inside the recorder: a list in JobStats' field order (made once per job, and
# a list costs a tenth of a JobStats to make); job_list() turns the records into JobStats.
_JOB_FIELDS = ("job_id", "status", "node_id", "submit_time", "start_time", "end_time", "runs", "verification",
               "bytes_sent", "bytes_received", "files", "provisional_results")
assert _JOB_FIELDS == tuple(f.name for f in fields(JobStats)), "the record layout must follow JobStats"
(_STATUS, _NODE_ID, _START_TIME, _END_TIME, _RUNS, _VERIFICATION, _BYTES_RECEIVED, _FILES, _PROVISIONAL) = (
    _JOB_FIELDS.index(name) for name in ("status", "node_id", "start_time", "end_time", "runs", "verification",
                                         "bytes_received", "files", "provisional_results"))


def _record(job: Any, nbytes: int) -> list[Any]:
    """A new record of ``job`` (a ClusterJob) whose pickled arguments are ``nbytes`` long."""
    return [str(job.id), "Created", None, job.submit_time, None, None, 0, None, nbytes, 0, 0, 0]


class StatsRecorder:
    """Counters the client's event loop updates; cheap enough for every job (a few dict updates).

    Keys are the jobs' internal keys (``ClusterJob._key``). A job's record is made when it is
    first needed, not at submission: at its first dispatch, when it ends without one (cancelled
    or abandoned while queued), or at once for jobs the trust layer manages (:meth:`submitted`).
    A job waiting in the queue thus costs nothing here; :func:`collect` lists it from the
    runtime's own table (:meth:`job_list`). ``max_jobs`` bounds the records kept (the oldest
    are dropped first, a tenth at a time; the totals stay exact). ``jobs`` holds the records
    as lists in :class:`JobStats`' field order (see :data:`_JOB_FIELDS`).
    """

    def __init__(self, max_jobs: int = 1_000_000) -> None:
        self.max_jobs = max_jobs
        self.nodes: dict[str, _NodeCounters] = {}
        self.jobs: dict[str, list[Any]] = {}
        self.stops = 0
        self.started = time.monotonic()

    def _node(self, node_id: str) -> _NodeCounters:
        counters = self.nodes.get(node_id)
        if counters is None:
            counters = self.nodes[node_id] = _NodeCounters()
        return counters

    def _new(self, job: Any, nbytes: int) -> list[Any]:
        """Make the record of ``job`` (a ClusterJob) whose pickled arguments are ``nbytes`` long."""
        if len(self.jobs) >= self.max_jobs:
            self._trim()
        record = self.jobs[job._key] = _record(job, nbytes)
        return record

    def _trim(self) -> None:
        """Drop the oldest tenth of the job records (the totals stay exact)."""
        for old in list(self.jobs)[: max(1, self.max_jobs // 10)]:
            del self.jobs[old]

    def submitted(self, job: Any, nbytes: int) -> None:
        """Record ``job`` now (the trust layer's jobs: their verdict may come before any run)."""
        if job._key not in self.jobs:
            self._new(job, nbytes)

    def dispatched(self, node_id: str, job: Any, nbytes: int, first: bool) -> None:
        """``job`` was sent to ``node_id`` (``first``: its first dispatch, which records it)."""
        node = self.nodes.get(node_id) or self._node(node_id)  # (once per job: no call when it exists)
        node.jobs_sent += 1
        node.bytes_sent += nbytes
        record = self.jobs.get(job._key)
        if record is None:
            if not first:  # dropped under max_jobs meanwhile: not recorded again
                return
            record = self._new(job, nbytes)
        record[_RUNS] += 1

    def reported(self, node_id: str, key: str, nbytes: int, cpu_time: float, job_time: float) -> None:
        node = self.nodes.get(node_id) or self._node(node_id)
        node.jobs_done += 1
        node.cpu_time += cpu_time
        node.job_time += max(0.0, job_time)
        node.bytes_received += nbytes
        record = self.jobs.get(key)
        if record is not None:
            record[_BYTES_RECEIVED] += nbytes

    def provisional(self, node_id: str, key: str) -> None:
        self._node(node_id).provisional_results += 1
        record = self.jobs.get(key)
        if record is not None:
            record[_PROVISIONAL] += 1

    def file_received(self, node_id: str, key: str, nbytes: int) -> None:
        node = self._node(node_id)
        node.files_received += 1
        node.bytes_received += nbytes
        record = self.jobs.get(key)
        if record is not None:
            record[_FILES] += 1
            record[_BYTES_RECEIVED] += nbytes

    def verdict(self, key: str, verdict: str) -> None:
        record = self.jobs.get(key)
        if record is not None:
            record[_VERIFICATION] = verdict

    def finished(self, job: Any, unsent: int | None = None) -> None:
        """``job`` ended (its status, node and times are set). ``unsent``: for a job the
        runtime held that ended before any dispatch (cancelled, abandoned), the size of its
        pickled arguments, which records it now; None for any other job (one that waited
        only for upstream results is not recorded, as it was never submitted to a node)."""
        record = self.jobs.get(job._key)
        if record is None:
            if unsent is None:  # never submitted, or its record was dropped under max_jobs
                return
            record = self._new(job, unsent)
        # _value_ is the member's value (Enum's .value is a Python-level property: per job)
        record[_STATUS], record[_NODE_ID] = job.status._value_, job.node_id
        record[_START_TIME], record[_END_TIME] = job.start_time, job.end_time

    def job_list(self, held: Any) -> list[JobStats]:
        """The job records as JobStats, plus one for each job of ``held`` (the runtime's table,
        ``key -> (job, args, timeout)``) that waits for its first dispatch, in submission order."""
        found: dict[str, JobStats] = {}
        for job, args, _timeout in held:
            if job._queued and job._key not in self.jobs and job._key not in found:
                found[job._key] = JobStats(str(job.id), submit_time=job.submit_time, bytes_sent=_userdata.size(args))
        pairs = [(key, JobStats(*record)) for key, record in self.jobs.items()]
        pairs.extend(found.items())
        # Keys count up as jobs are made (ClusterJob): records made at first dispatch and the
        # queued jobs fall back into submission order (a near-sorted run: a linear sort).
        pairs.sort(key=_submission_order)
        return [record for _key, record in pairs]

    def node_stats(self, node_id: str, **known: Any) -> NodeStats:
        """A NodeStats of ``node_id`` from its counters plus ``known`` fields (name, cpus...)."""
        counters = self.nodes.get(node_id) or _NodeCounters()
        return NodeStats(node_id=node_id, **known, **asdict(counters))


def _submission_order(pair: tuple[str, JobStats]) -> int:
    key = pair[0]
    return int(key) if key.isdigit() else -1


def collect(rt: Any) -> ClusterStats:
    """A snapshot of a client runtime's statistics (``JobCluster.stats``; in its event loop).

    ``rt`` is a ``clusterpy._runtime._Runtime``: its recorder, node links, scheduling core (speeds,
    load) and trust shell (verification and voting records)."""
    recorder: StatsRecorder = rt.stats
    trust = rt.trust.core.node_records() if rt.trust is not None else {}
    speeds = rt.core.speeds
    nodes = []
    for link in rt.links:
        if not link.joined or link.node_id is None:
            continue
        connected = rt.by_node.get(link.node_id) is link
        node = recorder.node_stats(
            link.node_id, name=link.name, hostname=link.hostname, ip_addr=link.ip_addr, cpus=link.cpus,
            connected=connected, busy=rt.core.inflight(link.node_id) if connected else 0, score=link.score,
            speed=speeds.speed(link.node_id) if connected else link.score, observed_job_time=speeds.observed(link.node_id))
        node.jobs_done, node.cpu_time = link.jobs_done, link.cpu_time
        record = trust.get(link.node_id)
        if record is not None:
            node.verified, node.failed_verification = record.verified, record.failed_verification
            node.agreed, node.disagreed = record.agreed, record.disagreed
            node.trusted, node.distrust_reason = record.distrusted is None, record.distrusted
        nodes.append(node)
    return ClusterStats(
        computation=rt.cluster.computation_name, jobs_submitted=rt.cluster._jobs_submitted,
        jobs_done=sum(n.jobs_done for n in nodes), cpu_time=sum(n.cpu_time for n in nodes),
        elapsed=time.monotonic() - recorder.started, stops=recorder.stops,
        untrusted_nodes=[n.node_id for n in nodes if not n.trusted], nodes=nodes,
        jobs=recorder.job_list(rt.jobs.values()))
