"""NodeLink: one authenticated connection to a node, kept up for its owner.

Used by the client (JobCluster) and by clusterpy-scheduler, which owns many computations on
the same nodes. The link reconnects after a loss (the node may come back, or be restarted as a
new incarnation, which the owner sees as a new ``node_id``), deploys computations on request
(the DeployComputation / FilesNeeded / FileChunk / ComputationReady exchange, message-driven so
several computations can deploy at once), and hands every other message to its owner.

Owner callbacks (called in the event loop)::

    link_up(link)             connected and authenticated; link.node_id, cpus, ... are set
    link_message(link, msg)   any message that is not part of a deployment
    link_down(link, reason)   the connection ended (after link_up)
    link_refused(link, exc)   the node refused us for good (wrong secret, versions): no retry
"""

from __future__ import annotations

import asyncio
import logging
import ssl as _ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from . import deps as deps_mod
from .errors import AuthenticationError, ClusterError, ConnectionClosedError, ProtocolError, VersionMismatchError
from .identity import local_info
from .protocol import codec
from .protocol import messages as m
from .transport.stream import Connection, connect

__all__ = ["NodeLink", "LinkOwner", "DeploymentRefused", "FileSource"]

log = logging.getLogger("clusterpy.nodelink")

PERMANENT = (AuthenticationError, VersionMismatchError)
CHUNK = 1 << 20
_DEPLOY_REPLIES = frozenset({m.FilesNeeded, m.ComputationReady, m.ComputationFailed})


class DeploymentRefused(ClusterError):
    """The node refused a computation (bad file, quota, unsafe name): retrying cannot help."""


class LinkOwner(Protocol):
    def link_up(self, link: "NodeLink") -> None: ...
    def link_message(self, link: "NodeLink", msg: object) -> None: ...
    def link_down(self, link: "NodeLink", reason: str) -> None: ...
    def link_refused(self, link: "NodeLink", exc: BaseException) -> None: ...


@dataclass(frozen=True)
class FileSource:
    """Where to read a file the node asks for."""

    sha256: str
    path: str
    size: int


@dataclass
class _Deploy:
    files: dict[str, FileSource]
    done: asyncio.Future[None]


class NodeLink:
    def __init__(
        self,
        owner: LinkOwner,
        host: str,
        port: int,
        *,
        secret: bytes,
        role: str = "client",
        expected_roles: frozenset[str] = frozenset({"node"}),
        ssl: _ssl.SSLContext | None = None,
        connect_timeout: float = 10.0,
        reconnect_delay: float = 0.5,
        info: Callable[[], dict[str, str]] = local_info,
    ) -> None:
        self.owner = owner
        self.host = host
        self.port = port
        self.secret = secret
        self.role = role
        self.expected_roles = expected_roles
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.info = info
        self.conn: Connection | None = None
        self.node_id: str | None = None
        self.hostname = host
        self.ip_addr = host
        self.cpus = 0
        self.peer_info: dict[str, str] = {}
        self.up = False
        self.last_heard = 0.0
        self.error: BaseException | None = None
        self.stopped = False
        self._lost_reason: str | None = None
        self._deploys: dict[str, _Deploy] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def name(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<NodeLink {self.name} {'up' if self.up else 'down'}>"

    # ---------------------------------------------------------------- sending

    def send(self, message: object) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.send(codec.encode_parts(message))

    async def drain(self) -> None:
        if self.conn is not None and not self.conn.closed:
            await self.conn.drain()

    def declare_lost(self, reason: str) -> None:
        """Drop the connection; the read loop then reports the link down and reconnects."""
        if self.conn is not None and not self.conn.closed:
            self._lost_reason = reason
            self.conn.close()

    def stop(self, reason: str = "link stopped") -> None:
        """No more reconnection; drop the connection."""
        self.stopped = True
        self.declare_lost(reason)

    # ---------------------------------------------------------------- deployment

    async def deploy(self, message: m.DeployComputation, files: Iterable[FileSource]) -> None:
        """Deploy a computation on this node, sending only the files it does not have.

        Raises:
            DeploymentRefused: the node refused it.
            ConnectionClosedError: the link went down meanwhile.
        """
        if self.conn is None or self.conn.closed:
            raise ConnectionClosedError(f"node {self.name} is not connected")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deploys[message.comp_id] = _Deploy({f.sha256: f for f in files}, done)
        try:
            self.send(message)
            await done
        finally:
            self._deploys.pop(message.comp_id, None)

    def _on_deploy_reply(self, msg: m.FilesNeeded | m.ComputationReady | m.ComputationFailed) -> bool:
        deploy = self._deploys.get(msg.comp_id)
        if deploy is None:
            return False
        if isinstance(msg, m.FilesNeeded):
            self._spawn(self._send_files(msg.comp_id, deploy, msg.sha256s))
        elif isinstance(msg, m.ComputationReady):
            if not deploy.done.done():
                deploy.done.set_result(None)
        elif not deploy.done.done():
            deploy.done.set_exception(DeploymentRefused(f"node {self.name} refused the computation: {msg.reason}"))
        return True

    async def _send_files(self, comp_id: str, deploy: _Deploy, wanted: tuple[str, ...]) -> None:
        try:
            for sha in wanted:
                source = deploy.files.get(sha)
                if source is None:
                    raise ProtocolError(f"node {self.name} asked for a file we did not offer ({sha[:12]})")
                entry = deps_mod.FileEntry(sha, source.path, source.size, sha, 0o644)
                for chunk in deps_mod.iter_chunks(entry, CHUNK):
                    self.send(m.FileChunk(comp_id, sha, chunk, False))
                    await self.drain()
                self.send(m.FileChunk(comp_id, sha, b"", True))
                await self.drain()
        except (ClusterError, OSError) as exc:
            if not deploy.done.done():
                deploy.done.set_exception(exc if isinstance(exc, ClusterError) else ConnectionClosedError(str(exc)))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- connection loop

    async def run(self) -> None:
        """Connect, serve, and reconnect after losses until stopped or refused for good."""
        try:
            while not self.stopped:
                conn = await self._connect()
                if conn is None:
                    return
                await self._serve(conn)
                if not self.stopped:
                    await asyncio.sleep(self.reconnect_delay)
        finally:
            for task in list(self._tasks):
                task.cancel()
            if self.conn is not None:
                await self.conn.aclose()

    async def _connect(self) -> Connection | None:
        delay = self.reconnect_delay
        while not self.stopped:
            try:
                return await connect(self.host, self.port, secret=self.secret, role=self.role, info=self.info(),
                                     expected_peer_roles=self.expected_roles, ssl=self.ssl,
                                     handshake_timeout=self.connect_timeout)
            except PERMANENT as exc:
                self.error = exc
                log.error("node %s refused us and will not be retried: %s", self.name, exc)
                self.owner.link_refused(self, exc)
                return None
            except (ClusterError, OSError, asyncio.TimeoutError) as exc:
                self.error = exc
                log.debug("node %s not reachable yet: %s", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        return None

    def _on_payload(self, payload: bytes | bytearray) -> bool:
        """Handle one message from the node (ProtocolError: it is malformed)."""
        self.last_heard = time.monotonic()
        msg = codec.decode(payload)
        kind = type(msg)  # exactly a message class (the codec checks): no isinstance needed
        if kind in _DEPLOY_REPLIES and self._on_deploy_reply(msg):
            return True
        if kind is m.Ping:
            self.send(m.Pong(msg.sent))
            return True
        owner = self.owner
        # A JobsDone holds the reports of one write (the codec checked them): each is handed on
        # as if it had come alone, so the owners know only JobDone.
        for one in msg.reports if kind is m.JobsDone else (msg,):
            try:
                owner.link_message(self, one)
            except Exception:  # a bug of ours must be loud, but must not stall the link (or the rest)
                log.exception("error handling %s from node %s", type(one).__name__, self.name)
        return True

    async def _serve(self, conn: Connection) -> None:
        self.conn = conn
        self.peer_info = dict(conn.peer_info)
        self.node_id = conn.peer_info.get("node_id", self.name)
        self.hostname = conn.peer_info.get("hostname", self.host)
        peer = conn.peername
        self.ip_addr = peer[0] if peer else self.host
        self.cpus = max(1, int(conn.peer_info.get("cpus", "1")))
        self.last_heard = time.monotonic()
        self.up = True
        self.error = None
        reason = "connection closed"
        try:
            self.owner.link_up(self)
            # Messages are handled as they are read (no task wake-up per message); recv()
            # returns only what arrived while this task was not waiting.
            conn.deliver_eagerly(self._on_payload)
            while True:
                self._on_payload(await conn.recv())
        except ConnectionClosedError:
            reason = self._lost_reason or "connection closed by the node"
        except (ProtocolError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("link to %s failed: %s", self.name, reason)
        finally:
            self.up = False
            self._lost_reason = None
            await conn.aclose()
            for deploy in self._deploys.values():
                if not deploy.done.done():
                    deploy.done.set_exception(ConnectionClosedError(f"node {self.name} lost during deployment: {reason}"))
            self.owner.link_down(self, reason)


def sources_from_entries(entries: Iterable[deps_mod.FileEntry]) -> list[FileSource]:
    return [FileSource(e.sha256, e.path, e.size) for e in entries]


def sources_from_store(store: Any, metas: Iterable[m.FileMeta]) -> list[FileSource]:
    """Files a scheduler holds in its FileStore cache."""
    out = []
    for meta in metas:
        path: Path | None = store.path_of(meta.sha256)
        if path is not None:
            out.append(FileSource(meta.sha256, str(path), meta.size))
    return out
