"""What the node's worker pool is given and gives back: a computation to load, a job to run,
the job's outcome, and what a running job sends before its end. Plain data, no I/O; used by
:mod:`clusterpy.pool`, :mod:`clusterpy._poolworker` and the node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ComputationSpec", "WorkerJob", "JobOutcome", "JobMessage", "outcome_from_reply", "REPLY_FIELDS"]


@dataclass(frozen=True)
class ComputationSpec:
    """A computation as the node hands it to the pool.

    ``bundle`` (kind "function") is ``cloudpickle.dumps({"compute": fn, "setup": fn | None,
    "cleanup": fn | None, "depends": [...], "setup_args": tuple})`` made in one call, so the
    functions share their globals. ``program`` (kind "program") is the argv prefix; job
    arguments are appended with ``str()``. ``workdir`` is an existing absolute directory:
    the jobs' cwd, prepended to ``sys.path``. ``env`` is set in ``os.environ`` during setup,
    jobs and cleanup (and so inherited by programs).
    """

    comp_id: str
    kind: str
    workdir: str
    bundle: bytes | None = field(repr=False)
    program: list[str] | None
    env: dict[str, str] | None = None


# WorkerJob and JobOutcome are made for every job: slotted, immutable by convention rather
# than frozen (a frozen dataclass sets each field through object.__setattr__; under callgrind
# a frozen WorkerJob took 3 times the instructions to build, and a JobOutcome filled from a
# reply into its __dict__ 3.4 times).


@dataclass(slots=True)
class WorkerJob:
    """One call of a computation: ``args`` is ``cloudpickle.dumps((args_tuple, kwargs_dict))``."""

    job_id: str
    comp_id: str
    args: bytes = field(repr=False)


@dataclass(slots=True)
class JobOutcome:
    """How a job ended. ``status`` is one of "finished", "exception", "died", "terminated",
    "setup_failed". Blobs are cloudpickle bytes; ``exit_code`` is a program's exit code or
    a dead worker's return code (negative: killed by that signal)."""

    job_id: str
    status: str
    result: bytes | None = field(repr=False)
    exception: bytes | None = field(repr=False)
    exc_type: str | None
    exc_message: str | None
    traceback: str | None
    stdout: bytes
    stderr: bytes
    start_time: float
    end_time: float
    cpu_time: float
    exit_code: int | None


#: The order of the fields in a worker's "done" reply.
REPLY_FIELDS = tuple(JobOutcome.__dataclass_fields__)
_FIELD_COUNT = len(REPLY_FIELDS)
#: What a worker may report (the pool makes "died" and "terminated" outcomes itself).
_REPLY_STATUSES = frozenset({"finished", "exception", "setup_failed"})
_BYTES = (bytes, memoryview)  # a large one arrives as a view of the frame (out of band)
_PAYLOAD = (bytes, memoryview, tuple)  # a user payload: see clusterpy._userdata


def outcome_from_reply(fields: tuple[Any, ...]) -> JobOutcome:
    """The JobOutcome of a worker's "done" reply: its fields as a tuple, in :data:`REPLY_FIELDS`
    order.

    A tuple, because it pickles without the 13 keys a dict would carry (the node unpickles it
    in half the time). The check is cheap but refuses a reply of another shape or order: it
    must be a tuple of 13 whose fields have the types of the JobOutcome fields, with a status
    that a worker reports. What the blobs hold is not looked at here (only the client
    unpickles them).

    Raises:
        TypeError: ``fields`` is not such a tuple.
    """
    if type(fields) is not tuple or len(fields) != _FIELD_COUNT:
        raise TypeError(f"a worker's reply must be a tuple of the {_FIELD_COUNT} JobOutcome fields, "
                        f"not {type(fields).__name__} {_shape(fields)}")
    (job_id, status, result, exception, exc_type, exc_message, traceback, stdout, stderr,
     start_time, end_time, cpu_time, exit_code) = fields
    if not (type(job_id) is str and type(status) is str and status in _REPLY_STATUSES
            and (result is None or isinstance(result, _PAYLOAD))
            and (exception is None or isinstance(exception, _BYTES))
            and (exc_type is None or type(exc_type) is str)
            and (exc_message is None or type(exc_message) is str)
            and (traceback is None or type(traceback) is str)
            and isinstance(stdout, _BYTES) and isinstance(stderr, _BYTES)
            and type(start_time) is float and type(end_time) is float and type(cpu_time) is float
            and (exit_code is None or type(exit_code) is int)):
        raise TypeError(f"malformed worker reply: {_shape(fields)}")
    return JobOutcome(*fields)


def _shape(fields: object) -> str:
    """The types in a reply, for an error message (its values may be large or private)."""
    if isinstance(fields, tuple):
        return "(" + ", ".join(type(field).__name__ for field in fields) + ")"
    return ""


@dataclass(frozen=True)
class JobMessage:
    """Something a running job sent before its end (:mod:`clusterpy.progress`), handed to
    ``run(..., on_message=)`` in order: a provisional result (``kind`` "progress", ``value``
    the cloudpickle bytes) or a piece of a file (``kind`` "file": ``name``, ``data``, ``last``;
    ``error`` if the transfer failed or was refused: what came before it is void)."""

    job_id: str
    kind: str
    value: bytes | None = field(default=None, repr=False)
    name: str = ""
    data: bytes = field(default=b"", repr=False)
    last: bool = False
    error: str | None = None
