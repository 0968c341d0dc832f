"""recover_jobs: collect the results of a client that died, from its journal and its nodes.

The journal says which jobs were submitted, where each attempt was sent, and which ended.
Jobs that ended are rebuilt from the journal. For the others, every node they were sent to is
asked to re-attach the computation (``AttachComputation``): it sends the results it kept while
no client was attached, then the results of jobs still running, as they end.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import _userdata
from .errors import ClusterError, ConnectionClosedError, NodeLostError
from .identity import local_info
from .job import ClusterJob, JobStatus, apply_report
from .journal import JournalContents, JournalWriter, read_journal
from .protocol import codec
from .protocol import messages as m
from . import tls
from .secret import load_secret
from .transport.stream import connect

__all__ = ["recover_jobs"]

log = logging.getLogger("clusterpy.recovery")


@dataclass
class _Recovered:
    job: ClusterJob
    attempt: int = 0
    node_id: str | None = None
    ended: bool = False


@dataclass
class _NodeRecord:
    node_id: str
    host: str
    port: int
    ip_addr: str
    hostname: str
    jobs: dict[tuple[str, int], _Recovered] = field(default_factory=dict)


def _finish(rec: _Recovered, status: JobStatus, result: Any = None, exc: BaseException | None = None) -> None:
    job = rec.job
    rec.ended = True
    job.status, job.result, job.exception = status, result, exc
    if exc is None:
        job._future.set_result(result)
    else:
        job._future.set_exception(exc)


def _never_sent(rec: _Recovered) -> None:
    rec.ended = True
    rec.job.status = JobStatus.Created
    rec.job.ip_addr = None


def _load(path: str, secret: bytes) -> tuple[str, dict[str, _Recovered], dict[str, _NodeRecord], JournalContents]:
    contents = read_journal(path, secret)
    if contents.torn:
        log.warning("journal %s ends in a torn record (its writer died mid-write); using what precedes it", path)
    comp_id = contents.header["comp_id"]
    jobs: dict[str, _Recovered] = {}
    nodes: dict[str, _NodeRecord] = {}
    for record in contents.records:
        kind = record[0]
        if kind == "node":
            _, node_id, host, port, ip_addr, hostname = record
            nodes[node_id] = _NodeRecord(node_id, host, port, ip_addr, hostname)
        elif kind == "submit":
            _, key, user_id, args_blob, _timeout = record
            args, kwargs = _userdata.loads(args_blob)
            job = ClusterJob(None, args, kwargs, time.time())
            job._key, job.id = key, user_id
            jobs[key] = _Recovered(job)
        elif kind == "dispatch":
            _, key, node_id, attempt = record
            if key in jobs:
                jobs[key].attempt, jobs[key].node_id = attempt, node_id
                jobs[key].job.status = JobStatus.Running
        elif kind == "done":
            _, key, node_id, msg = record
            rec = jobs.get(key)
            node = nodes.get(node_id)
            if rec is None or rec.ended:
                continue
            where = f"on node {node.host}:{node.port}" if node else "on its node"
            status, result, exc = apply_report(
                rec.job, msg, ip_addr=node.ip_addr if node else "?", node_id=node_id,
                hostname=node.hostname if node else "?", where=where)
            _finish(rec, status, result, exc)
        elif kind == "resolved":
            _, key, state, reason = record
            rec = jobs.get(key)
            if rec is not None and not rec.ended:
                if state == "cancelled":
                    _finish(rec, JobStatus.Cancelled, exc=ClusterError(reason))
                else:
                    _finish(rec, JobStatus.Abandoned, exc=NodeLostError(reason))
    for rec in jobs.values():
        if not rec.ended and rec.node_id is not None:
            node = nodes.get(rec.node_id)
            if node is not None:
                node.jobs[(rec.job._key, rec.attempt)] = rec
            else:
                _finish(rec, JobStatus.Abandoned, exc=NodeLostError("its node is not in the journal"))
    return comp_id, jobs, nodes, contents


async def _collect(comp_id: str, node: _NodeRecord, secret: bytes, journal: JournalWriter, *, wait: bool,
                   deadline: float | None, pulse: float, ssl: Any = None) -> None:
    """Re-attach to one node and resolve the journal's jobs that were sent there."""
    def abandon(reason: str) -> None:
        for rec in node.jobs.values():
            if not rec.ended:
                _finish(rec, JobStatus.Abandoned, exc=NodeLostError(reason))

    where = f"{node.host}:{node.port}"

    def accept(msg: m.JobDone) -> None:
        rec = node.jobs.get((msg.job_id, msg.attempt))
        if rec is not None and not rec.ended:
            journal.append("done", msg.job_id, node.node_id, msg)  # the node forgets it once sent
            journal.flush()
            status, result, exc = apply_report(rec.job, msg, ip_addr=node.ip_addr, node_id=node.node_id,
                                               hostname=node.hostname, where=f"on node {where}")
            _finish(rec, status, result, exc)
    try:
        conn = await connect(node.host, node.port, secret=secret, role="client", info=local_info(),
                             expected_peer_roles=frozenset({"node", "scheduler"}), ssl=ssl)
    except (ClusterError, OSError) as exc:
        abandon(f"node {where} cannot be reached to recover the job: {exc}")
        return
    async with conn:
        if conn.peer_info.get("node_id") != node.node_id:
            abandon(f"node {where} was restarted since the job was sent; its results are lost")
            return
        conn.send(codec.encode(m.AttachComputation(comp_id)))
        await conn.drain()
        loop = asyncio.get_running_loop()
        kept_left: int | None = None
        pending: set[tuple[str, int]] = set()
        next_ping = loop.time() + pulse
        while True:
            unresolved = [k for k, r in node.jobs.items() if not r.ended]
            if not unresolved:
                break
            if kept_left == 0 and not wait:
                break  # the kept results are in; the rest are still running
            if kept_left == 0:
                # The node re-attached (same incarnation) and neither runs nor kept these jobs:
                # they never reached it (the client died between journaling and sending them).
                for key in unresolved:
                    if key not in pending:
                        _never_sent(node.jobs[key])
                if not (pending & set(unresolved)):
                    break
            now = loop.time()
            if deadline is not None and now >= deadline:
                break
            limit = min(next_ping, deadline) if deadline is not None else next_ping
            try:
                payload = await asyncio.wait_for(conn.recv(), max(0.0, limit - now))
            except TimeoutError:
                conn.send(codec.encode(m.Ping(time.time())))  # stay alive: the node watches for zombies
                next_ping = loop.time() + pulse
                continue
            except ConnectionClosedError:
                abandon(f"node {where} was lost while recovering")
                return
            msg = codec.decode(payload)
            if isinstance(msg, m.ComputationFailed):
                abandon(f"node {where}: {msg.reason}")
                return
            if isinstance(msg, m.Attached):
                kept_left = msg.kept
                pending = set(msg.pending)
            elif isinstance(msg, (m.JobDone, m.JobsDone)):
                # Kept results come one by one; those of jobs that end meanwhile may come
                # several in a JobsDone (the codec checked its reports): each as if alone.
                for report in msg.reports if isinstance(msg, m.JobsDone) else (msg,):
                    if kept_left:
                        kept_left -= 1
                    pending.discard((report.job_id, report.attempt))
                    accept(report)
            elif isinstance(msg, m.Ping):
                conn.send(codec.encode(m.Pong(msg.sent)))
        if all(r.ended for r in node.jobs.values()):
            conn.send(codec.encode(m.CloseComputation(comp_id)))  # release the node's files
            await conn.drain()
            return
        # Leave the rest to a later call: after Detached, the node keeps every result for it.
        conn.send(codec.encode(m.DetachComputation(comp_id)))
        await conn.drain()
        try:
            while True:
                msg = codec.decode(await asyncio.wait_for(conn.recv(), 10))
                if isinstance(msg, m.Detached):
                    break
                if isinstance(msg, m.JobDone):
                    accept(msg)
                elif isinstance(msg, m.JobsDone):
                    for report in msg.reports:
                        accept(report)
        except (TimeoutError, ClusterError):
            pass


async def recover_jobs_async(path: str | os.PathLike[str], *, secret: str | bytes | None = None,
                             secret_file: str | os.PathLike[str] | None = None, wait: bool = True,
                             timeout: float | None = None, pulse_interval: float = 2.0,
                             certfile: str | os.PathLike[str] | None = None, keyfile: str | os.PathLike[str] | None = None,
                             cafile: str | os.PathLike[str] | None = None) -> list[ClusterJob]:
    """asyncio flavour of :func:`recover_jobs`."""
    key = load_secret(secret, secret_file=secret_file)
    ssl = tls.client_context_from(certfile, keyfile, cafile)
    comp_id, jobs, nodes, contents = _load(os.fspath(path), key)
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    journal = JournalWriter.resume(path, key, contents)
    try:
        await asyncio.gather(*(
            _collect(comp_id, node, key, journal, wait=wait, deadline=deadline, pulse=pulse_interval, ssl=ssl)
            for node in nodes.values() if node.jobs
        ))
    finally:
        journal.close()
    return [rec.job for rec in jobs.values()]


def recover_jobs(path: str | os.PathLike[str], *, secret: str | bytes | None = None,
                 secret_file: str | os.PathLike[str] | None = None, wait: bool = True,
                 timeout: float | None = None, certfile: str | os.PathLike[str] | None = None,
                 keyfile: str | os.PathLike[str] | None = None,
                 cafile: str | os.PathLike[str] | None = None) -> list[ClusterJob]:
    """Recover the jobs of a client that died, from its ``recover_file`` journal.

    Returns every job the journal names, in submission order: jobs that ended (in the journal,
    or since, on their nodes) carry their results; with ``wait`` (the default) jobs still
    running on their nodes are waited for (up to ``timeout``), otherwise they are returned
    with status ``Running`` and can be recovered by a later call. Jobs that were never sent to
    a node have status ``Created``: resubmit them (``job.args``, ``job.kwargs``). Jobs whose
    node was lost or restarted end ``Abandoned`` with a :class:`NodeLostError`.
    ``certfile``/``keyfile``/``cafile`` (or their environment variables): TLS, as for JobCluster.

    Raises:
        JournalError: the file is not a journal, or was written with another secret.
    """
    return asyncio.run(recover_jobs_async(path, secret=secret, secret_file=secret_file, wait=wait, timeout=timeout,
                                          certfile=certfile, keyfile=keyfile, cafile=cafile))
