"""What clusterpy itself runs inside a worker: shipped functions, map chunks, scattered data.

The client puts one of these *invocations* first in a job's positional arguments; the worker
(:meth:`clusterpy.worker._Worker.run`) sees an :class:`Invocation` there and lets it decide
how to call, instead of calling the computation directly::

    client                                           worker
    ------                                           ------
    Call(fn)            --pickled once per submit--> rebuilt from a per-worker cache keyed by
                                                     the function's content hash: fn(*args)
    Chunk(call, items)  --one job, k items-------->  [f(*item) for item in items]; a failing
                                                     item says its index and value
    Scattered(sha)      --a 100-byte handle------->  load_scattered(sha): the object, unpickled
                                                     once per worker from the computation's
                                                     .clusterpy-scatter/<sha> file

This module is imported by workers, so it must stay light: no asyncio, nothing from the
client. Everything here is picklable by reference (clusterpy is installed on every node).
"""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import reprlib
from typing import Any, Callable

__all__ = [
    "Invocation",
    "Call",
    "Chunk",
    "apply",
    "load_scattered",
    "forget_workdir",
    "SCATTER_DIR",
    "PARTIAL_ATTR",
    "INDEX_ATTR",
    "cache_info",
]

#: Directory (relative to the computation's directory on a node) holding scattered objects.
SCATTER_DIR = ".clusterpy-scatter"
#: Attribute set on an exception raised by an item of a chunk: results of the items before it.
PARTIAL_ATTR = "_clusterpy_partial"
#: Attribute set on an exception raised by an item of a chunk: the item's index in the map.
INDEX_ATTR = "clusterpy_map_index"

# Functions rebuilt from their pickled bytes, by content hash (least recently used dropped).
_FN_CACHE_SIZE = 256
_functions: collections.OrderedDict[str, Any] = collections.OrderedDict()
# Scattered objects loaded in this worker, by (computation directory, hash).
_scattered: dict[tuple[str, str], Any] = {}
_stats = {"fn_hits": 0, "fn_loads": 0, "scatter_loads": 0}
# Client side: modules whose functions were checked for shipping by value (a client's own,
# uninstalled modules are; see clusterpy._byvalue).
_modules_checked: set[str | None] = set()


def apply(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The computation of a :class:`~clusterpy.ClusterExecutor`'s own cluster: ``fn(*args, **kwargs)``.

    Jobs normally carry a :class:`Call` and never reach this; it makes a plain
    ``cluster.submit(fn, ...)`` on such a cluster work too."""
    return fn(*args, **kwargs)


class Invocation:
    """Base of the objects a worker recognises as "call me instead of the computation"."""

    __slots__ = ()

    def invoke(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the job; ``target`` calls the cluster's computation."""
        raise NotImplementedError


class Call(Invocation):
    """Run ``fn`` (any picklable callable) instead of the cluster's computation.

    The function is cloudpickled once, when the Call is made; the worker keeps the rebuilt
    function under the blob's SHA-256, so a function sent with many jobs is unpickled once
    per worker (its bytes still travel with every job: they are small).
    """

    __slots__ = ("fn", "sha", "blob")

    def __init__(self, fn: Callable[..., Any], *, _sha: str | None = None, _blob: bytes | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        self.fn = fn
        if _blob is None:
            import cloudpickle

            module = getattr(fn, "__module__", None)
            if module not in _modules_checked:  # the check costs ~1 ms; its effect is global
                from ._byvalue import pickle_by_value_if_local as _pickle_by_value_if_local

                _pickle_by_value_if_local(fn)
                _modules_checked.add(module)
            _blob = cloudpickle.dumps(fn, protocol=5)
            _sha = hashlib.sha256(_blob).hexdigest()
        self.sha = _sha
        self.blob = _blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_call, (self.sha, self.blob))

    def invoke(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Call({getattr(self.fn, '__qualname__', self.fn)!r})"


def _rebuild_call(sha: str, blob: bytes) -> Call:
    fn = _functions.get(sha)
    if fn is None:
        fn = pickle.loads(blob)
        _stats["fn_loads"] += 1
        _functions[sha] = fn
        if len(_functions) > _FN_CACHE_SIZE:
            _functions.popitem(last=False)
    else:
        _stats["fn_hits"] += 1
        _functions.move_to_end(sha)
    return Call(fn, _sha=sha, _blob=b"")


class Chunk(Invocation):
    """Run ``f(*item)`` for each item (a tuple of arguments) and return the list of results.

    ``f`` is ``call.fn``, or the cluster's computation when ``call`` is None. ``start`` is the
    index of the first item in the whole map, so that a failure names the item: the exception
    gets a note ("item 17 of the map: 'x'"), ``clusterpy_map_index`` = 17, and the results of
    the items before it (which the client yields before raising).
    """

    __slots__ = ("call", "items", "start")

    def __init__(self, call: Call | None, items: list[tuple[Any, ...]], start: int) -> None:
        self.call = call
        self.items = items
        self.start = start

    def __reduce__(self) -> tuple[Any, ...]:
        return (Chunk, (self.call, self.items, self.start))

    def invoke(self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        fn = self.call.fn if self.call is not None else target
        results: list[Any] = []
        for offset, item in enumerate(self.items):
            try:
                results.append(fn(*item))
            except BaseException as exc:  # noqa: BLE001 -- annotate any failure, then let it go on
                index = self.start + offset
                shown = reprlib.repr(item[0] if len(item) == 1 else item)
                try:
                    exc.add_note(f"clusterpy: raised by item {index} of the map: {shown}")
                    setattr(exc, INDEX_ATTR, index)
                    setattr(exc, PARTIAL_ATTR, results)
                except (AttributeError, TypeError):  # an exception type that refuses attributes
                    pass
                raise
        return results

    def __repr__(self) -> str:
        return f"Chunk(items {self.start}..{self.start + len(self.items) - 1})"


def load_scattered(sha: str) -> Any:
    """Rebuild a scattered object in a job (see :mod:`clusterpy.scatter`).

    The object is read from ``.clusterpy-scatter/<sha>`` in the computation's directory (the
    job's working directory) and unpickled once per worker; later jobs get the same object,
    so jobs must treat it as read-only.

    Raises:
        LookupError: the file is not there: the handle came from another cluster, or this is
            not a job (a handle is a reference to data on the nodes).
    """
    # The computation's directory: a return_files job runs in a private directory where
    # SCATTER_DIR is a link to the computation's (clusterpy.progress.private_dir).
    key = (os.path.dirname(os.path.realpath(SCATTER_DIR)), sha)
    try:
        return _scattered[key]
    except KeyError:
        pass
    path = os.path.join(key[0], SCATTER_DIR, sha)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except FileNotFoundError:
        raise LookupError(
            f"scattered object {sha[:12]} is not on this node: a scatter handle can be used only in "
            "jobs of the cluster that scattered it") from None
    _scattered[key] = obj
    _stats["scatter_loads"] += 1
    return obj


def forget_workdir(workdir: str) -> None:
    """Drop the scattered objects of a computation that this worker unloads."""
    for key in [k for k in _scattered if k[0] == workdir]:
        del _scattered[key]


def cache_info() -> dict[str, int]:
    """This worker's cache counters (for tests and benchmarks): function loads and hits,
    scattered objects loaded, and how many of each are held now."""
    return {**_stats, "functions": len(_functions), "scattered": len(_scattered)}
