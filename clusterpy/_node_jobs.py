"""What a node holds for each computation and each job: the records the node's parts share.

::

    NodeServer.comps: comp_id -> Computation (owned by the node, not by a connection)
        .owner      the client session it reports to (OwnerSession), None while its client is away
        .jobs       key -> QueuedJob, from SubmitJobs until the job's report is made
        .kept_path  results kept on disk for a client that is away (keep / take_kept / drop_kept)

The session (node_session.py) makes them, the run queue (_runqueue.py) runs the jobs, the
session's outbox (_node_reports.py) reports them. Nothing here unpickles user data: kept results
are the opaque bytes the worker made, in codec frames.
"""

from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection

__all__ = ["QueuedJob", "Computation", "PendingAdd", "OwnerSession", "job_key"]

_LEN = struct.Struct(">I")


def job_key(comp_id: str, job_id: str, attempt: int) -> str:
    """A job's key on this node: one attempt of one job of one computation."""
    return f"{comp_id}/{job_id}/{attempt}"


class OwnerSession(Protocol):
    """What the node asks of the client session that owns a computation (implemented by
    clusterpy.node_session.ClientSession)."""

    conn: Connection
    comps: dict[str, "Computation"]

    def started(self, job: "QueuedJob") -> None: ...
    def deliver(self, message: m.JobDone | m.JobProgress | m.JobFile, key: str | None = None, *,
                last: bool = False) -> None: ...


@dataclass(eq=False, slots=True)
class QueuedJob:
    """A job on this node: queued, then ``started`` (given CPU slots), then ``done`` (its
    slots are free again; its report is sent or kept). Slots: 100,000 of them may be queued."""

    comp: "Computation"
    request: m.JobRequest
    key: str  # unique on this node: comp_id/job_id/attempt
    cancelled: bool = False
    timed_out: bool = False
    started: bool = False
    behind: bool = False  # written to a busy worker, to start when its job ends (WorkerPool.try_queue)
    done: bool = False
    cpus: int = 0  # the CPU slots it takes (set when it is queued), held while it runs
    # Only for a job that had to wait for a worker (WorkerPool.run): most run without a task.
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None  # its timeout
    ended: asyncio.Future[None] | None = None  # made only when someone waits for its end


@dataclass(eq=False)
class Computation:
    comp_id: str
    deploy: m.DeployComputation
    workdir: Path
    kept_path: Path
    owner: OwnerSession | None = None
    incoming: dict[str, object] = field(default_factory=dict)  # sha256 -> IncomingFile
    ready: bool = False
    jobs: dict[str, QueuedJob] = field(default_factory=dict)  # key -> job
    kept: int = 0
    kept_bytes: int = 0
    lease: asyncio.TimerHandle | None = None
    # Scatter (AddFiles): files being added in order, jobs held until they are in place,
    # and transfers that failed whose remaining chunks are ignored.
    adds: list["PendingAdd"] = field(default_factory=list)
    held: list[QueuedJob] = field(default_factory=list)
    discarding: set[str] = field(default_factory=set)

    def keep(self, message: m.JobDone) -> int:
        """Append a result for a client that is away; returns the bytes used."""
        data = codec.encode(message)
        fd = os.open(self.kept_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, _LEN.pack(len(data)) + data)
        finally:
            os.close(fd)
        self.kept += 1
        self.kept_bytes += len(data) + _LEN.size
        return len(data) + _LEN.size

    def take_kept(self) -> Iterator[object]:
        """Yield the kept results in order and forget them."""
        if not self.kept:
            return
        try:
            data = self.kept_path.read_bytes()
        except FileNotFoundError:
            data = b""
        self.drop_kept()
        offset = 0
        while offset + _LEN.size <= len(data):
            (size,) = _LEN.unpack_from(data, offset)
            offset += _LEN.size
            yield codec.decode(data[offset:offset + size])
            offset += size

    def drop_kept(self) -> None:
        self.kept = 0
        self.kept_bytes = 0
        try:
            self.kept_path.unlink()
        except FileNotFoundError:
            pass


@dataclass(eq=False)
class PendingAdd:
    """One AddFiles being received; ``error`` once it failed (reported in FilesAdded)."""

    msg: m.AddFiles
    error: str | None = None
