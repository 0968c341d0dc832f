"""What the node's worker pool is given and gives back: a computation to load, a job to run,
the job's outcome, and what a running job sends before its end. Plain data, no I/O; used by
:mod:`clusterpy.pool`, :mod:`clusterpy._poolworker` and the node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ComputationSpec", "WorkerJob", "JobOutcome", "JobMessage", "outcome_from_reply"]


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


@dataclass(frozen=True)
class WorkerJob:
    """One call of a computation: ``args`` is ``cloudpickle.dumps((args_tuple, kwargs_dict))``."""

    job_id: str
    comp_id: str
    args: bytes = field(repr=False)


@dataclass(frozen=True)
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


_OUTCOME_FIELDS = frozenset(JobOutcome.__dataclass_fields__)


def outcome_from_reply(fields: dict[str, Any]) -> JobOutcome:
    """``JobOutcome(**fields)`` for a worker's "done" reply, at a fifth of the cost (a frozen
    dataclass's ``__init__`` sets each of its 13 fields through ``object.__setattr__``): once
    the keys are checked, the fields fill the new instance's ``__dict__`` directly.

    Raises:
        TypeError: ``fields`` is not a dict of exactly the JobOutcome fields.
    """
    if type(fields) is not dict or fields.keys() != _OUTCOME_FIELDS:
        return JobOutcome(**fields)  # raises a TypeError that names the wrong field
    outcome = object.__new__(JobOutcome)
    outcome.__dict__.update(fields)
    return outcome


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
