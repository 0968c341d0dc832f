"""Messages exchanged after authentication, between a client (or scheduler) and a node.

Every message is a slotted dataclass, immutable by convention (not frozen: a frozen dataclass
takes 8x as long to construct, and these are built once per job on every hop);
:mod:`clusterpy.protocol.codec` turns them into bytes and back and refuses anything that is not listed in :data:`MESSAGE_TYPES`. User data (the
computation, job arguments, results) travels inside them as opaque :data:`Blob` s (cloudpickle
bytes made on the client or in a worker): the node routes them without unpickling them. A
decoded message's large blobs are read-only ``memoryview`` s into the received frame (pickle
protocol 5 out-of-band buffers, see :mod:`~clusterpy.protocol.codec`), so they are never
copied on the way through; anything that takes a bytes-like object accepts them.

Flow for one computation::

    client                                   node
      DeployComputation(files manifest) ->
                                          <- FilesNeeded(sha256s not in the node's cache)
      FileChunk ... (only the missing ones) ->
                                          <- ComputationReady | ComputationFailed
      SubmitJobs(batch) ->
                                          <- JobsStarted(batch)
                                          <- JobProgress, JobFile ... (while a job runs)
                                          <- JobDone (a job ended) | JobsDone (the reports
                                             of one computation that end in one loop turn)
      CancelJob ->
      RecallJobs ->                       (work stealing: jobs not started yet)
                                          <- JobsRecalled (those given back unstarted)
      AddFiles(files manifest) ->         (scatter: files for a ready computation)
                                          <- FilesNeeded; FileChunk ... ->; <- FilesAdded
      CloseComputation ->
      Ping <-> Pong (either side; liveness)

    StatusRequest ->                      (any time, with or without a computation)
                                          <- StatusReply
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable, TypeAlias

from . import outofband

__all__ = [
    "FileMeta",
    "DeployComputation",
    "FilesNeeded",
    "FileChunk",
    "ComputationReady",
    "ComputationFailed",
    "JobRequest",
    "SubmitJobs",
    "JobStart",
    "JobsStarted",
    "JobDone",
    "JobsDone",
    "JobProgress",
    "JobFile",
    "CancelJob",
    "RecallJobs",
    "JobsRecalled",
    "AddFiles",
    "FilesAdded",
    "AttachComputation",
    "Attached",
    "DetachComputation",
    "Detached",
    "CloseComputation",
    "Ping",
    "Pong",
    "StatusRequest",
    "StatusReply",
    "Blob",
    "UserData",
    "OUT_OF_BAND_MIN",
    "Message",
    "MESSAGE_TYPES",
    "PICKLED_FIELDS",
]

#: Opaque bytes inside a message: ``bytes`` as made, a read-only ``memoryview`` as decoded
#: (when it travelled out of band).
Blob: TypeAlias = bytes | memoryview
#: A user's object as pickled by :mod:`clusterpy._userdata`: a pickle, or a tuple of a pickle
#: and the large buffers it refers to (each travels out of band, keeping its writability).
UserData: TypeAlias = Blob | tuple[Blob | bytearray, ...]

#: Blobs at least this large travel as pickle-5 out-of-band buffers (no copy into or out of
#: the message's pickle); smaller ones are cheaper in band.
OUT_OF_BAND_MIN = outofband.MIN_SIZE


@dataclass(slots=True)
class FileMeta:
    """One file of a computation: where it goes (relative name), its content hash, size, mode."""

    name: str
    sha256: str
    size: int
    mode: int


@dataclass(slots=True)
class DeployComputation:
    """Announce a computation. ``bundle`` is a cloudpickle blob for functions, ``program`` the
    argv prefix (names relative to the computation directory) for standalone programs.
    ``dest_path``: a name (one path component) for the computation's directory under the
    node's dest path instead of a private one; the node keeps it after the computation closes."""

    comp_id: str
    kind: str  # "function" | "program"
    files: tuple[FileMeta, ...]
    bundle: Blob | None
    program: tuple[str, ...] | None
    keep_files: bool = False
    reentrant: bool = False  # a shared scheduler resubmits this computation's jobs when a node is lost
    dest_path: str | None = None


@dataclass(slots=True)
class FilesNeeded:
    comp_id: str
    sha256s: tuple[str, ...]


@dataclass(slots=True)
class FileChunk:
    comp_id: str
    sha256: str
    data: Blob
    last: bool


@dataclass(slots=True)
class ComputationReady:
    comp_id: str


@dataclass(slots=True)
class ComputationFailed:
    comp_id: str
    reason: str


@dataclass(slots=True)
class JobRequest:
    job_id: str
    attempt: int
    args: UserData  # the pickled (args, kwargs)
    timeout: float | None = None
    cpus: int = 1  # CPUs the job occupies on the node while it runs


@dataclass(slots=True)
class SubmitJobs:
    comp_id: str
    jobs: tuple[JobRequest, ...]


@dataclass(slots=True)
class JobStart:
    job_id: str
    attempt: int
    start_time: float


@dataclass(slots=True)
class JobsStarted:
    comp_id: str
    jobs: tuple[JobStart, ...]


@dataclass(slots=True)
class JobDone:
    """A job ended on the node. ``status`` is the worker's outcome status:
    finished | exception | died | terminated | setup_failed | cancelled."""

    comp_id: str
    job_id: str
    attempt: int
    status: str
    result: UserData | None
    exception: Blob | None
    exc_type: str | None
    exc_message: str | None
    traceback: str | None
    stdout: Blob
    stderr: Blob
    start_time: float
    end_time: float
    cpu_time: float
    exit_code: int | None

    @property
    def data_size(self) -> int:
        """Bytes of the job's data it carries: its result and its output."""
        size = len(self.stdout) + len(self.stderr)
        return size if self.result is None else size + outofband.payload_size(self.result)

    def dropped(self, keeper: str, attempt: int | None = None) -> JobDone:
        """This report with its result and output dropped, for a client that was away while
        ``keeper`` (who kept the results: "node", "scheduler") ran out of room for them: the
        job ends in a ``ResultDropped`` exception instead (under ``attempt``, if given)."""
        return JobDone(self.comp_id, self.job_id, self.attempt if attempt is None else attempt, "exception",
                       None, None, "ResultDropped",
                       f"the {keeper}'s budget for kept results was full; the result was dropped", None,
                       b"", b"", self.start_time, self.end_time, self.cpu_time, self.exit_code)


@dataclass(slots=True)
class JobsDone:
    """Several jobs of one computation ended: their reports, in the order they ended, in one
    message (one frame to seal, open and decode instead of one per job). The node sends it for
    the reports that leave in one write; a single report travels as a :class:`JobDone`. A
    receiver handles each report exactly as if it had come alone. The codec refuses a JobsDone
    holding anything but JobDone s of ``comp_id``."""

    comp_id: str
    reports: tuple[JobDone, ...]


@dataclass(slots=True)
class JobProgress:
    """A running job's provisional result (``clusterpy.provisional_result``): cloudpickle bytes.
    Sent before the job's :class:`JobDone`, in the order the job sent them."""

    comp_id: str
    job_id: str
    attempt: int
    value: Blob


@dataclass(slots=True)
class JobFile:
    """A piece of a file a running job sends back (``clusterpy.send_file``); ``last`` ends the
    file. ``error``: the transfer failed or was refused (over the node's size limit): the
    client discards what it received of that file."""

    comp_id: str
    job_id: str
    attempt: int
    name: str
    data: Blob
    last: bool
    error: str | None = None


@dataclass(slots=True)
class CancelJob:
    comp_id: str
    job_id: str
    attempt: int


@dataclass(slots=True)
class RecallJobs:
    """Give back these jobs if they have not started (work stealing); the node answers with
    JobsRecalled for those it gave back and runs the others as usual."""

    comp_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt)


@dataclass(slots=True)
class JobsRecalled:
    comp_id: str
    jobs: tuple[tuple[str, int], ...]  # (job_id, attempt), removed from the node unstarted


@dataclass(slots=True)
class AddFiles:
    """Add files to a ready computation (``cluster.scatter``). The node answers
    :class:`FilesNeeded` (the hashes it lacks: :class:`FileChunk` s follow for those), then
    :class:`FilesAdded`. Jobs submitted after AddFiles on the same connection start only once
    its files are in place."""

    comp_id: str
    files: tuple[FileMeta, ...]


@dataclass(slots=True)
class FilesAdded:
    """The files of one :class:`AddFiles` are in the computation's directory (or ``error``)."""

    comp_id: str
    sha256s: tuple[str, ...]
    error: str | None = None


@dataclass(slots=True)
class AttachComputation:
    """Re-attach to a computation a vanished client left on the node (crash recovery).

    The node answers :class:`Attached` and then sends the results it kept, or
    :class:`ComputationFailed` if it no longer has the computation."""

    comp_id: str


@dataclass(slots=True)
class Attached:
    comp_id: str
    pending: tuple[tuple[str, int], ...]  # (job_id, attempt) still queued or running on the node
    kept: int  # results the node kept while no client was attached; they follow as JobDone


@dataclass(slots=True)
class DetachComputation:
    """The client leaves without closing: the node keeps the computation's results for a later
    ``AttachComputation`` and answers :class:`Detached`; nothing sent after that is lost."""

    comp_id: str


@dataclass(slots=True)
class Detached:
    comp_id: str


@dataclass(slots=True)
class CloseComputation:
    comp_id: str
    keep_files: bool = False


@dataclass(slots=True)
class Ping:
    sent: float


@dataclass(slots=True)
class Pong:
    sent: float


@dataclass(slots=True)
class StatusRequest:
    """Ask a node how it is doing (``clusterpy status``); needs no computation."""

    sent: float


@dataclass(slots=True)
class StatusReply:
    """A node's state now. ``busy``: jobs running; ``busy_cpus``: CPUs they occupy;
    ``queued``: jobs waiting for a CPU; ``load``: the 1, 5 and 15 minute load averages;
    ``uptime``: seconds since the node started."""

    sent: float
    node_id: str
    hostname: str
    version: str
    cpus: int
    busy: int
    busy_cpus: int
    queued: int
    jobs_done: int
    clients: int
    load: tuple[float, float, float]
    uptime: float


Message = (
    DeployComputation
    | FilesNeeded
    | FileChunk
    | ComputationReady
    | ComputationFailed
    | SubmitJobs
    | JobsStarted
    | JobDone
    | JobsDone
    | JobProgress
    | JobFile
    | CancelJob
    | RecallJobs
    | JobsRecalled
    | AddFiles
    | FilesAdded
    | AttachComputation
    | Attached
    | DetachComputation
    | Detached
    | CloseComputation
    | Ping
    | Pong
    | StatusRequest
    | StatusReply
)

# Everything the codec may construct while decoding; nothing else is ever looked up.
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (
        FileMeta,
        DeployComputation,
        FilesNeeded,
        FileChunk,
        ComputationReady,
        ComputationFailed,
        JobRequest,
        SubmitJobs,
        JobStart,
        JobsStarted,
        JobDone,
        JobsDone,
        JobProgress,
        JobFile,
        CancelJob,
        RecallJobs,
        JobsRecalled,
        AddFiles,
        FilesAdded,
        AttachComputation,
        Attached,
        DetachComputation,
        Detached,
        CloseComputation,
        Ping,
        Pong,
        StatusRequest,
        StatusReply,
    )
}


# Fields holding user data: pickled out of band when large (see _blob).
_BLOB_FIELDS: dict[type, frozenset[str]] = {
    DeployComputation: frozenset({"bundle"}),
    FileChunk: frozenset({"data"}),
    JobRequest: frozenset({"args"}),
    JobDone: frozenset({"result", "exception", "stdout", "stderr"}),
    JobProgress: frozenset({"value"}),
    JobFile: frozenset({"data"}),
}


def _blob(value: UserData | None, protocol: int) -> object:
    """What a blob field pickles as: small ``bytes`` as themselves; anything large, and any
    view, as a read-only :class:`pickle.PickleBuffer` (protocol 5); user data's buffers
    (the items of a tuple) as buffers that keep their writability. A pickler given a
    ``buffer_callback`` (the codec's) sends those out of band; any other pickles them in band
    as ``bytes``/``bytearray``, so a message holding views pickles anywhere (journal, kept
    results)."""
    if value is None or (type(value) is bytes and len(value) < OUT_OF_BAND_MIN):
        return value
    if isinstance(value, tuple):
        if protocol >= 5:
            return outofband.wrap(value)
        return tuple([bytes(part) if memoryview(part).readonly else bytearray(part) for part in value])
    if protocol < 5:
        return bytes(value)
    view = memoryview(value)
    return pickle.PickleBuffer(view if view.readonly else view.toreadonly())


#: Each message type's fields in constructor order, as its pickles carry them:
#: ``PICKLED_FIELDS[cls](message, protocol)`` (large blobs as out-of-band buffers, see
#: :func:`_blob`). Pickling a message reduces it to ``cls(*fields)``; the codec sends the
#: per-job messages as tuples of these fields instead (:mod:`.codec`).
PICKLED_FIELDS: dict[type, Callable[[object, int], tuple[object, ...]]] = {}


def _reduce_to_constructor(cls: type) -> None:
    """Pickle ``cls`` as ``cls(*fields)``: about 3x faster both ways than the dataclass's own
    ``__getstate__``/``__setstate__`` (a dict of slots, set one by one), and decoding still
    goes through ``__init__``, so a decoded message is exactly one its constructor accepts."""
    names = tuple(f for f in cls.__slots__ if not f.startswith("__"))  # type: ignore[attr-defined]
    getter = attrgetter(*names)
    blobs = _BLOB_FIELDS.get(cls)

    if blobs is None:
        def fields_one(self: object, protocol: int) -> tuple[object, ...]:
            return (getter(self),)

        def fields_many(self: object, protocol: int) -> tuple[object, ...]:
            return getter(self)

        def reduce_one(self: object) -> tuple[type, tuple[object, ...]]:
            return (cls, (getter(self),))

        def reduce_many(self: object) -> tuple[type, tuple[object, ...]]:
            return (cls, getter(self))

        PICKLED_FIELDS[cls] = fields_one if len(names) == 1 else fields_many
        setattr(cls, "__reduce__", reduce_one if len(names) == 1 else reduce_many)
        return

    blob_at = tuple(i for i, name in enumerate(names) if name in blobs)

    def fields_blobs(self: object, protocol: int) -> tuple[object, ...]:
        values: tuple[object, ...] = getter(self)
        for i in blob_at:
            value = values[i]
            if value is not None and (type(value) is not bytes or len(value) >= OUT_OF_BAND_MIN):
                return tuple(_blob(v, protocol) if j in blob_at else v  # type: ignore[arg-type]
                             for j, v in enumerate(values))
        return values

    def reduce_blobs(self: object, protocol: int) -> tuple[type, tuple[object, ...]]:
        return (cls, fields_blobs(self, protocol))

    PICKLED_FIELDS[cls] = fields_blobs
    setattr(cls, "__reduce_ex__", reduce_blobs)


for _cls in MESSAGE_TYPES.values():
    _reduce_to_constructor(_cls)
