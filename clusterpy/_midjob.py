"""The client's handling of what a job sends while it runs: provisional results and files.

::

    node JobProgress(job, attempt, value) -> current attempt of a job we hold? -> unpickle
        -> job.status = ProvisionalResult, job.result = value -> callback(snapshot of the job)
    node JobFile(job, attempt, name, piece) -> FileReceiver -> <files_dir>/<job id>/<name>
        -> job.files gets the path once the last piece is in place

A message about an attempt that is no longer current (a node that came back after its jobs
moved) is ignored, as the scheduling core ignores its late report. With replicas, only the
first replica's messages are used (they are not verified: only final results are). The
callback gets a snapshot of the job taken when the value arrived, so a slow callback still
sees each value in turn; all of them come before the job's final callback.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import cloudpickle

from .errors import ClusterError
from .job import ClusterJob, JobStatus
from .jobfiles import FileReceiver, job_dir_name
from .protocol import messages as m

if TYPE_CHECKING:
    from ._runtime import _NodeLink, _Runtime

__all__ = ["MidJob", "snapshot"]

log = logging.getLogger("clusterpy.client")


def snapshot(job: ClusterJob) -> ClusterJob:
    """A shallow copy of ``job`` (same future: calling it still waits for the final result)."""
    job.future  # made now if it was not (jobs make it lazily), so that the copy shares it
    copy = object.__new__(ClusterJob)
    for name in ClusterJob.__slots__:
        if name != "__weakref__" and hasattr(job, name):
            setattr(copy, name, getattr(job, name))
    return copy


class MidJob:
    """Provisional results and files of the runtime's running jobs (loop thread only)."""

    def __init__(self, rt: "_Runtime", files_dir: str, max_file_size: int) -> None:
        self.rt = rt
        self.receiver = FileReceiver(files_dir, max_file_size)
        #: Whether a job ever sent a file piece: until then a job's end has nothing to discard
        #: here (the runtime skips :meth:`ended` per job).
        self.receiving = False

    def _current(self, link: "_NodeLink", job_id: str, attempt: int) -> ClusterJob | None:
        entry = self.rt.jobs.get(job_id)
        if entry is None or entry[0]._key != job_id:  # gone, or a later replica: ignored
            return None
        core = self.rt.core
        if core.attempt_of(job_id) != attempt or core.node_of(job_id) != link.node_id:
            return None
        return entry[0]

    def on_progress(self, link: "_NodeLink", msg: m.JobProgress) -> None:
        job = self._current(link, msg.job_id, msg.attempt)
        if job is None:
            log.debug("ignored a provisional result of job %s attempt %d", msg.job_id, msg.attempt)
            return
        try:
            value = cloudpickle.loads(msg.value)
        except Exception as exc:  # noqa: BLE001 -- the job goes on; say why this value is missing
            log.warning("a provisional result of job %r from %s cannot be unpickled here: %r", job.id, link.name, exc)
            return
        job.status, job.result = JobStatus.ProvisionalResult, value
        assert link.node_id is not None
        self.rt.stats.provisional(link.node_id, job._key)
        self.rt.cluster._job_done(snapshot(job))

    def on_file(self, link: "_NodeLink", msg: m.JobFile) -> None:
        self.receiving = True
        job = self._current(link, msg.job_id, msg.attempt)
        if job is None:
            log.debug("ignored a file piece of job %s attempt %d", msg.job_id, msg.attempt)
            return
        try:
            path = self.receiver.piece((msg.job_id, msg.attempt, msg.name), job_dir_name(job.id, job._key),
                                       msg.data, msg.last, msg.error)
        except ClusterError as exc:
            log.warning("job %r on %s: %s", job.id, link.name, exc)
            return
        if path is not None:
            job.files.append(path)
            assert link.node_id is not None
            self.rt.stats.file_received(link.node_id, job._key, _size(path))

    def ended(self, replica_id: str) -> None:
        """A run of a job ended: what it had not finished sending is discarded."""
        self.receiver.abort_job(replica_id)

    def close(self) -> None:
        self.receiver.close()


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
