"""Dataflow between jobs: a job (or future) among a job's arguments is replaced by its result.

::

    user thread                      cluster loop thread
    -----------                      -------------------
    submit(f, a_job, [b_job])
      pickling fails on the jobs  ->  Dependents.hold(job, upstream)     (job waits, no thread)
                                      each upstream future's done-callback
                                        -> loop: _upstream_done (counts down)
                                      last one done: substitute results, pickle, _Runtime.submit
                                      one failed:    the job fails at once with
                                                     UpstreamJobError (cause: that exception)

Upstream jobs and futures are found at the top level of the arguments and nested in lists,
tuples, dicts, sets and frozensets (exact built-in types), and among a map chunk's items. The pickling that every submit does
anyway is the fast path: only arguments that cannot be pickled are searched, so plain jobs
pay nothing. A waiting job is owned by the cluster's runtime: the cluster stays busy (``wait``
and ``close`` wait for it) and cancelling it drops it.
"""

from __future__ import annotations

import concurrent.futures
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._submit import dumps_args
from ._remote import Chunk
from .errors import ClusterClosedError, ClusterError, JobCancelledError, UpstreamJobError
from .job import ClusterJob, JobStatus

if TYPE_CHECKING:
    from ._runtime import _Runtime

__all__ = ["find_upstream", "substitute", "Dependents"]

_CONTAINERS = (list, tuple, dict, set, frozenset)


def _label(obj: Any) -> str:
    return f"job {obj.id!r}" if isinstance(obj, ClusterJob) else "an upstream future"


def find_upstream(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[concurrent.futures.Future[Any], str]]:
    """The distinct jobs and futures among the arguments, as ``(future, label)`` pairs."""
    found: dict[int, tuple[concurrent.futures.Future[Any], str]] = {}
    seen: set[int] = set()
    stack: list[Any] = [args, kwargs]
    while stack:
        obj = stack.pop()
        if isinstance(obj, ClusterJob):
            found.setdefault(id(obj.future), (obj.future, _label(obj)))
        elif isinstance(obj, concurrent.futures.Future):
            found.setdefault(id(obj), (obj, _label(obj)))
        elif type(obj) in _CONTAINERS and id(obj) not in seen:
            seen.add(id(obj))  # a container that holds itself is visited once
            stack.extend(obj.items() if type(obj) is dict else obj)
        elif type(obj) is Chunk:  # executor.map(fn, futures, chunksize=k)
            stack.append(obj.items)
    return list(found.values())


def substitute(obj: Any, memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with every job or future (nested as :func:`find_upstream` searches) replaced by
    its result; containers are rebuilt, other objects kept. The futures must be done."""
    if memo is None:
        memo = {}
    if isinstance(obj, ClusterJob):
        return obj.future.result(0)
    if isinstance(obj, concurrent.futures.Future):
        return obj.result(0)
    kind = type(obj)
    if kind is Chunk:
        return Chunk(obj.call, substitute(obj.items, memo), obj.start)
    if kind not in _CONTAINERS:
        return obj
    if id(obj) in memo:
        return memo[id(obj)]
    if kind is list:
        out: Any = []
        memo[id(obj)] = out
        out.extend(substitute(v, memo) for v in obj)
        return out
    if kind is dict:
        out = {}
        memo[id(obj)] = out
        for k, v in obj.items():
            out[substitute(k, memo)] = substitute(v, memo)
        return out
    out = kind(substitute(v, memo) for v in obj)
    memo[id(obj)] = out
    return out


@dataclass(eq=False)
class _Waiting:
    job: ClusterJob
    timeout: float | None
    node: str | None
    remaining: int


class Dependents:
    """The jobs of one cluster that wait for upstream results; lives in the cluster's loop.

    Every method runs in the loop thread except where said. ``len()`` is the number waiting.
    """

    def __init__(self, runtime: "_Runtime") -> None:
        self._rt = runtime
        self._waiting: dict[str, _Waiting] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def hold(self, job: ClusterJob, upstream: list[tuple[concurrent.futures.Future[Any], str]],
             timeout: float | None, node: str | None) -> None:
        """Keep ``job`` until every upstream future is done, then submit it."""
        if self._rt.closing:
            self._rt.finish(job, JobStatus.Cancelled, exc=ClusterClosedError("the cluster closed before the job could run"))
            return
        self._waiting[job._key] = _Waiting(job, timeout, node, len(upstream))
        self._rt.idle.clear()
        for future, label in upstream:
            future.add_done_callback(functools.partial(self._schedule, job._key, label))

    def _schedule(self, key: str, label: str, future: concurrent.futures.Future[Any]) -> None:
        # Runs in whatever thread resolves the future (or in hold, if it is done already):
        # always continue in the loop, one step later, through the cluster's one way in.
        try:
            self._rt.inbox.call(self._upstream_done, key, future, label)
        except RuntimeError:  # the cluster closed meanwhile; its jobs were dealt with then
            pass

    def _upstream_done(self, key: str, future: concurrent.futures.Future[Any], label: str) -> None:
        waiting = self._waiting.get(key)
        if waiting is None:
            return  # cancelled, or already failed by another upstream
        job = waiting.job
        error: BaseException | None
        if future.cancelled():
            error = concurrent.futures.CancelledError(f"{label} was cancelled")
        else:
            error = future.exception()
        if error is not None:
            del self._waiting[key]
            exc = UpstreamJobError(f"job {job.id!r} did not run: {label} failed ({type(error).__name__}: {error})")
            exc.__cause__ = error
            self._rt.finish(job, JobStatus.Terminated, exc=exc)
            return
        waiting.remaining -= 1
        if waiting.remaining:
            return
        del self._waiting[key]
        try:
            args = substitute(job.args)
            kwargs = substitute(job.kwargs)
            blob = dumps_args(args, kwargs)
        except Exception as exc:
            error = ClusterError(f"the arguments of job {job.id!r} cannot be pickled: {exc!r}")
            error.__cause__ = exc
            self._rt.finish(job, JobStatus.Terminated, exc=error)
            return
        self._rt.submit(job, blob, waiting.timeout, waiting.node)

    def cancel(self, job: ClusterJob) -> bool:
        """Drop ``job`` if it waits (it ends Cancelled); False if it does not wait here."""
        waiting = self._waiting.pop(job._key, None)
        if waiting is None:
            return False
        self._rt.finish(job, JobStatus.Cancelled, exc=JobCancelledError(f"job {job.id!r} was cancelled"))
        return True

    def cancel_all(self) -> None:
        for waiting in list(self._waiting.values()):
            self.cancel(waiting.job)
