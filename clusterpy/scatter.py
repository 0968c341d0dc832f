"""Scatter: send a large object to the nodes once; jobs receive a small handle that becomes it.

::

    user thread                         cluster loop thread                  node / worker
    -----------                         -------------------                  -------------
    scatter(obj)
      cloudpickle obj into a private
      file, hashing it (SHA-256)   -->  ScatterState.add(entry)
                                          AddFiles(".clusterpy-scatter/<sha>") -> each node
                                                                <- FilesNeeded (what it lacks)
                                          FileChunk ... (only those)      ->  FileStore cache,
                                                                              placed in the
                                                                              computation dir
                                                                <- FilesAdded
      <- Scattered(sha) handle          (a node that joins later gets AddFiles for every
                                         scattered object before its first job)
    submit(f, handle)  --the handle pickles to a reference-->  worker: load_scattered(sha),
                                                               unpickled once per worker

The node's content-addressed file store makes the transfer once per node (and not at all
for an object the node already holds, e.g. from an earlier cluster). The node holds back
jobs that arrive after an AddFiles until its files are in place, so a handle is usable by
every job submitted after ``scatter`` returns, on every node, including nodes that join
later. Workers keep each loaded object until the cluster closes: treat it as read-only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from typing import TYPE_CHECKING, Any

import cloudpickle

from . import deps as deps_mod
from ._remote import SCATTER_DIR, load_scattered
from .errors import ClusterClosedError, ClusterError, ConfigurationError, DependencyError, ProtocolError
from .protocol import messages as m

if TYPE_CHECKING:
    from ._runtime import _NodeLink, _Runtime
    from .client import JobCluster

__all__ = ["Scattered", "ScatterState", "scatter", "scatter_async"]

log = logging.getLogger("clusterpy.scatter")


class Scattered:
    """A handle to an object scattered to the nodes; in a job it *is* the object.

    Pass it to ``submit`` (or ``map``, or inside lists and dicts): it pickles to a reference
    of about a hundred bytes, and a worker rebuilds the object from its node's copy, once.
    ``sha256`` and ``size`` describe the pickled object.
    """

    __slots__ = ("sha256", "size")

    def __init__(self, sha256: str, size: int) -> None:
        self.sha256 = sha256
        self.size = size

    def __reduce__(self) -> tuple[Any, ...]:
        return (load_scattered, (self.sha256,))

    def __repr__(self) -> str:
        return f"<Scattered {self.sha256[:12]} ({self.size} bytes pickled)>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scattered) and other.sha256 == self.sha256

    def __hash__(self) -> int:
        return hash(self.sha256)


class _HashingWriter:
    """A file-like sink for the pickler that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.hash.update(view)
        self.size += view.nbytes
        self._f.write(view)
        return view.nbytes


class ScatterState:
    """The scattered objects of one cluster and their transfers; lives in the cluster's loop.

    ``bytes_sent`` counts the object bytes sent to each node (by node address): a test of
    "once per node".
    """

    def __init__(self, runtime: "_Runtime") -> None:
        self._rt = runtime
        self.entries: dict[str, deps_mod.FileEntry] = {}
        self.bytes_sent: dict[str, int] = {}
        self._waiters: dict[tuple[int, str], list[asyncio.Future[None]]] = {}
        self._dir: str | None = None
        self._dir_lock = threading.Lock()

    # ---------------------------------------------------------------- user thread

    def dump(self, obj: Any) -> deps_mod.FileEntry:
        """Pickle ``obj`` into this cluster's scatter directory; return its file entry.

        Runs in the caller's thread (pickling a large object must not stall the loop).
        """
        with self._dir_lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="clusterpy-scatter-")
            directory = self._dir
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                cloudpickle.dump(obj, writer, protocol=5)
            sha = writer.hash.hexdigest()
            path = os.path.join(directory, sha)
            os.replace(tmp, path)  # the same object scattered twice: same name, same bytes
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return deps_mod.FileEntry(name=f"{SCATTER_DIR}/{sha}", path=path, size=writer.size, sha256=sha, mode=0o644)

    def remove_files(self) -> None:
        """Delete the pickled copies (the cluster closed)."""
        with self._dir_lock:
            directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    # ---------------------------------------------------------------- loop thread

    async def add(self, entry: deps_mod.FileEntry) -> None:
        """Send ``entry`` to every connected node and wait until each has placed it.

        A node lost meanwhile is not an error (it gets the file again when it rejoins).

        Raises:
            ClusterError: a node could not store the file (its quota, or a disk error).
        """
        if self._rt.closing:
            raise ClusterClosedError("this cluster is closed")
        self.entries.setdefault(entry.sha256, entry)
        waits = [self._send_add(link, (entry,))[0] for link in list(self._rt.by_node.values())]
        results = await asyncio.gather(*waits, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise ClusterError(f"scatter failed: {'; '.join(map(str, errors))}")

    def on_join(self, link: "_NodeLink") -> None:
        """A node joined (or rejoined): send it every scattered object before any job.

        Nobody waits for these; a failure is logged, and jobs on that node that use the
        handle fail with a LookupError naming the object."""
        if self.entries:
            for waiter in self._send_add(link, tuple(self.entries.values())):
                waiter.add_done_callback(self._log_failure)

    def _send_add(self, link: "_NodeLink", entries: tuple[deps_mod.FileEntry, ...]) -> list[asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        futures = []
        for entry in entries:
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault((id(link), entry.sha256), []).append(waiter)
            futures.append(waiter)
        link.flush()  # jobs already queued for this node go first: they do not need the files
        link.send(m.AddFiles(self._rt.comp_id, tuple(
            m.FileMeta(e.name, e.sha256, e.size, e.mode) for e in entries)))
        return futures

    @staticmethod
    def _log_failure(waiter: asyncio.Future[None]) -> None:
        if not waiter.cancelled() and waiter.exception() is not None:
            log.error("%s", waiter.exception())

    def on_files_needed(self, link: "_NodeLink", msg: m.FilesNeeded) -> None:
        """The node lacks these: stream them (a task owned by the runtime)."""
        for sha in msg.sha256s:
            if sha not in self.entries:
                raise ProtocolError(f"node {link.name} asked for a file that was not scattered ({sha[:12]})")
        if msg.sha256s:
            self._rt.spawn(self._stream(link, msg.sha256s))

    async def _stream(self, link: "_NodeLink", shas: tuple[str, ...]) -> None:
        conn = link.conn
        if conn is None:
            return
        from .protocol import codec

        for sha in shas:
            try:
                for chunk in deps_mod.iter_chunks(self.entries[sha], self._rt.chunk_size):
                    if conn.closed:
                        return
                    conn.send(codec.encode_parts(m.FileChunk(self._rt.comp_id, sha, chunk, False)))
                    self.bytes_sent[link.name] = self.bytes_sent.get(link.name, 0) + len(chunk)
                    await conn.drain()
            except DependencyError as exc:
                # The pickled copy changed or vanished: end the transfer short, so the node
                # rejects it (size or hash) and reports the failure in FilesAdded.
                log.warning("scatter to node %s: %s", link.name, exc)
            except (ClusterError, OSError):
                return  # the connection broke: the link's read loop reports the node lost
            try:
                conn.send(codec.encode(m.FileChunk(self._rt.comp_id, sha, b"", True)))
                await conn.drain()
            except (ClusterError, OSError):
                return

    def on_files_added(self, link: "_NodeLink", msg: m.FilesAdded) -> None:
        for sha in msg.sha256s:
            waiters = self._waiters.get((id(link), sha))
            if not waiters:
                continue
            waiter = waiters.pop(0)
            if not waiters:
                del self._waiters[(id(link), sha)]
            if waiter.done():
                continue
            if msg.error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(ClusterError(f"node {link.name} could not store scattered object "
                                                  f"{sha[:12]}: {msg.error}"))

    def link_lost(self, link: "_NodeLink") -> None:
        """Nobody waits for a node that is gone: it gets the files again if it rejoins."""
        for key in [k for k in self._waiters if k[0] == id(link)]:
            for waiter in self._waiters.pop(key):
                if not waiter.done():
                    waiter.set_result(None)


def _check(cluster: "JobCluster") -> None:
    if cluster._closed:
        raise ClusterClosedError("this cluster is closed; create a new JobCluster to scatter data")
    if "node" not in cluster._peer_roles:
        raise ConfigurationError("scatter needs direct connections to the nodes: a clusterpy-scheduler "
                                 "does not relay scattered data; pass the object as an argument instead")


def scatter(cluster: "JobCluster", obj: Any, timeout: float | None = None) -> Scattered:
    """Implementation of :meth:`JobCluster.scatter` (see there)."""
    _check(cluster)
    if isinstance(obj, Scattered):
        return obj
    state: ScatterState = cluster._rt.scatter
    entry = state.dump(obj)
    cluster._await(state.add(entry), timeout)
    return Scattered(entry.sha256, entry.size)


async def scatter_async(cluster: "JobCluster", obj: Any) -> Scattered:
    """Implementation of :meth:`JobCluster.scatter_async`: pickling runs in a thread."""
    _check(cluster)
    if isinstance(obj, Scattered):
        return obj
    state: ScatterState = cluster._rt.scatter
    entry = await asyncio.to_thread(state.dump, obj)
    await asyncio.wrap_future(cluster._inbox.run(state.add(entry)))
    return Scattered(entry.sha256, entry.size)
