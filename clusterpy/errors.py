"""The exceptions clusterpy raises, rooted at :class:`ClusterError`.

::

    ClusterError
    ├── ConfigurationError        bad option, missing secret file, unusable address
    ├── DependencyError           a dependency cannot be shipped or a peer's file name is unsafe
    ├── ClusterClosedError        submit() or similar on a closed cluster
    ├── QueueFullError            submit() found max_queued jobs waiting and its submit_timeout passed
    ├── ProtocolError             the peer broke the wire protocol (remote fault)
    │   ├── FrameTooLargeError    a length prefix over the current cap
    │   ├── AuthenticationError   wrong secret, bad MAC, replayed or reordered frame
    │   └── VersionMismatchError  protocol, Python or cloudpickle versions differ
    ├── ConnectionClosedError     the peer went away (EOF, reset) while we needed it
    ├── FileTooLargeError         clusterpy.send_file: the file is over the node's (or client's) limit
    └── JobError                  a job ended without a result of its own
        ├── WorkerDiedError       the worker process running the job died (exit code / signal)
        ├── JobTerminatedError    the job was stopped (timeout, cancel while running)
        ├── NodeLostError         the node holding the job was lost and the job was not resubmitted
        │   └── SchedulerLostError  the shared scheduler holding the job was lost
        ├── JobCancelledError     the job was cancelled before it ran
        ├── UpstreamJobError      a job or future it took as an argument failed (the cause)
        └── VerificationError     no result of the job could be trusted (verify, replica voting)

An exception raised by the user's own computation is re-raised unchanged by ``job()``,
with a :class:`RemoteTraceback` as its ``__cause__`` so the remote stack is visible.
"""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "ConfigurationError",
    "DependencyError",
    "ClusterClosedError",
    "QueueFullError",
    "ProtocolError",
    "FrameTooLargeError",
    "AuthenticationError",
    "VersionMismatchError",
    "ConnectionClosedError",
    "JobError",
    "WorkerDiedError",
    "JobTerminatedError",
    "NodeLostError",
    "SchedulerLostError",
    "JobCancelledError",
    "UpstreamJobError",
    "VerificationError",
    "FileTooLargeError",
    "RemoteTraceback",
]


class ClusterError(Exception):
    """Base class of every error clusterpy raises itself."""


class ConfigurationError(ClusterError):
    """An option, secret or address is unusable; the message says which and how to fix it."""


class DependencyError(ClusterError):
    """A dependency cannot be shipped, or a file name received from a peer is unsafe."""


class ClusterClosedError(ClusterError):
    """The cluster was closed; it accepts no new work."""


class QueueFullError(ClusterError):
    """``submit()`` waited ``submit_timeout`` seconds (0: not at all) while ``max_queued`` jobs
    were waiting to be dispatched, and no room came: the job was not submitted. Raised only
    when a submit timeout is set; by default ``submit()`` waits until there is room."""


class ProtocolError(ClusterError):
    """The peer sent something the protocol does not allow."""


class FrameTooLargeError(ProtocolError):
    """A frame's length prefix exceeds the cap in force."""


class AuthenticationError(ProtocolError):
    """The peer could not prove it holds the secret, or a frame failed its MAC or sequence check."""


class VersionMismatchError(ProtocolError):
    """The peers run incompatible protocol, Python or cloudpickle versions."""


class ConnectionClosedError(ClusterError):
    """The connection ended (EOF or reset) while the other side was still needed."""


class JobError(ClusterError):
    """A job ended without producing its own result or exception."""


class WorkerDiedError(JobError):
    """The worker process died while running the job (``exitcode`` < 0 is a signal number)."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class JobTerminatedError(JobError):
    """The job was terminated while running (its timeout passed, or it was cancelled)."""


class NodeLostError(JobError):
    """The node running or holding the job was lost, and the job was not resubmitted."""


class SchedulerLostError(NodeLostError):
    """The clusterpy-scheduler a SharedJobCluster used was lost; its unfinished jobs are abandoned."""


class JobCancelledError(JobError):
    """The job was cancelled before it started."""


class UpstreamJobError(JobError):
    """The job did not run: a job or future among its arguments failed or was cancelled.
    That upstream exception is the ``__cause__``."""


class VerificationError(JobError):
    """No result of the job could be trusted: it failed ``verify``, or the replicas that ran it
    did not agree, on every node it was run on (up to ``max_reruns``). The message says which."""


class FileTooLargeError(ClusterError):
    """A file a job sends back (``clusterpy.send_file``) is larger than allowed: the node's
    ``--max-send-file`` (raised in the job) or the client's ``max_file_size``."""


class RemoteTraceback(Exception):
    """Carries the formatted remote traceback; set as ``__cause__`` of re-raised remote errors."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb
