"""One worker process as the node's pool sees it: its pipes, the frames on them, its reply slot.

:class:`_Worker` writes commands to the worker's stdin pipe and reads its replies from the
stdout pipe (frames of :mod:`clusterpy._channel`, decoded by an unpickler that refuses every
class: nothing a job sends can make the node run code). One call is outstanding at a time; its
reply resolves ``_Worker.pending``: a future (:meth:`_Worker.call`, for ``WorkerPool.run``) or
a :class:`_ReplyHook` (``WorkerPool.try_run``, no task per job). Mid-job messages (provisional
results, file pieces) are checked and handed on as :class:`~clusterpy._workjob.JobMessage`.
The pool (:mod:`clusterpy.pool`) owns the workers, their replacement and the job outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._channel import FrameDecoder, encode_frame, enlarge_pipe
from ._channel import loads as channel_loads
from ._workjob import ComputationSpec, JobMessage, JobOutcome, WorkerJob
from .transport.pacing import PacedWriter

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("clusterpy.pool")

#: Seconds to wait, after a worker exited, for its pipes to close (a forked grandchild
#: outside its process group could hold them open forever).
EXIT_FLUSH_DELAY = 2.0


class _WorkerGone(Exception):
    """The worker process exited while a call to it was outstanding."""

    def __init__(self, returncode: int | None) -> None:
        super().__init__(returncode)
        self.returncode = returncode


class _BuiltinsOnly(pickle.Unpickler):
    # Worker frames hold only tuples, dicts, str, bytes, numbers: refuse anything that
    # would import and call code, so a job writing to the channel cannot reach the node.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"worker frames may not contain {module}.{name}")


def _loads(frame: bytes | bytearray) -> tuple[Any, ...]:
    message = channel_loads(frame, _BuiltinsOnly)
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise pickle.UnpicklingError(f"malformed worker message of type {type(message).__name__}")
    return message


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "signal"
        return f"was killed by {name} ({-returncode})"
    return f"exited with status {returncode}"


class _Worker:
    """One worker process as the pool sees it; at most one call is outstanding at a time."""

    def __init__(self, pool: WorkerPool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.SubprocessTransport | None = None
        self.pid = 0
        self.decoder = FrameDecoder()
        # The first reply is the unasked ("ready", pid).
        self.pending: asyncio.Future[tuple[Any, ...]] | None = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self.returncode: int | None = None
        self.ready = False
        self.loaded: dict[str, ComputationSpec] = {}
        # The pool's specs version when ``loaded`` was last found free of stale computations.
        self.specs_checked = -1
        self.options: dict[str, Any] | None = None  # the job options the worker has
        self.stdin: asyncio.WriteTransport | None = None
        self.job_id: str | None = None
        self.terminating = False
        self.killed = False
        # While a job runs: where its mid-job messages go, and the bytes of each file so far.
        self.on_message: Any = None
        self.file_bytes: dict[str, int] = {}
        self._timers: list[asyncio.TimerHandle] = []
        # Writes to the stdin pipe, large parts in pieces as it drains (see transport.pacing),
        # and the pipe's flow control.
        self.writer: PacedWriter | None = None
        self.write_paused = False
        # A job written to the worker while ``pending``'s ran, to start as soon as that one
        # ends (WorkerPool.try_queue): its reply slot, waiting for its turn.
        self.behind: _QueuedHook | None = None

    def __repr__(self) -> str:
        return f"<worker {self.pid} job={self.job_id}>"

    # -- called from the pool ----------------------------------------------------------

    async def call(self, message: tuple[Any, ...], size_hint: int = 0) -> tuple[Any, ...]:
        """Send ``message`` (holding about ``size_hint`` bytes of blobs) and return the worker's
        reply; raises _WorkerGone if it exits first."""
        if self.exited.done():
            raise _WorkerGone(self.returncode)
        assert self.pending is None, "one call at a time"
        self._write(message, size_hint)
        future = self.pending = self.loop.create_future()
        try:
            return await future
        finally:
            if self.pending is future:
                self.pending = None

    def send_exit(self) -> None:
        """Ask an idle worker to run its cleanups and exit."""
        if not self.exited.done():
            self._write(("exit",))

    def kill(self) -> None:
        """SIGKILL the worker's whole process group (it and every process its jobs started)."""
        if self.exited.done() or not self.pid:
            return
        # Its exit may be seen only later (a reply already in the pipe still arrives): until
        # then it must not be handed another job, so it leaves the idle list now.
        self.killed = True
        if self in self.pool._idle:
            self.pool._idle.remove(self)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _write(self, message: tuple[Any, ...], size_hint: int = 0) -> None:
        assert self.writer is not None
        for part in encode_frame(message, size_hint):  # large blobs written from where they are
            self.writer.write(part)

    # -- called from _WorkerProtocol ---------------------------------------------------

    def attach(self, transport: asyncio.SubprocessTransport) -> None:
        self.transport = transport
        self.pid = transport.get_pid()
        self.pool._workers.add(self)
        stdin, stdout = transport.get_pipe_transport(0), transport.get_pipe_transport(1)
        assert isinstance(stdin, asyncio.WriteTransport)
        self.stdin = stdin
        self.writer = PacedWriter(stdin, lambda: self.write_paused)
        # Bigger pipes: a 1 MB payload crosses in one or two writes, not sixteen. (The read
        # transport still reads at most 256 KiB per wake-up: larger reads each cost a fresh
        # mmap, and page faults, even for a 200-byte frame.)
        for pipe_transport in (stdin, stdout):
            pipe = pipe_transport.get_extra_info("pipe") if pipe_transport is not None else None
            if pipe is not None:
                enlarge_pipe(pipe.fileno(), self.pool._pipe_size)
        if isinstance(stdout, asyncio.ReadTransport):
            # Data read from here on is handled in the read callback (see _ChannelReader);
            # what was read before still comes through pipe_data_received, in order.
            stdout.set_protocol(_ChannelReader(self, stdout.get_protocol()))

    def on_data(self, data: bytes) -> None:
        try:
            messages = [_loads(frame) for frame in self.decoder.feed(data)]
        except Exception:
            log.exception("worker %d broke the channel protocol; killing it", self.pid)
            self.kill()
            return
        for message in messages:
            if message[0] in ("progress", "file"):
                self._job_message(message)
                continue
            future = self.pending
            if future is None or future.done():
                # Expected from a killed worker, and while the pool closes: the call that
                # awaited it (an unload, say) was cancelled, but its reply still comes.
                expected = self.killed or self.pool._state != "open"
                log.log(logging.DEBUG if expected else logging.WARNING,
                        "worker %d sent an unexpected %r message", self.pid, message[0])
                continue
            self.pending = None
            future.set_result(message)

    def _job_message(self, message: tuple[Any, ...]) -> None:
        """Check a mid-job message's shape and size, and pass it on (or drop it: nobody asked)."""
        try:
            if message[0] == "progress":
                _, job_id, value = message
                if not isinstance(value, (bytes, memoryview)):
                    raise TypeError("value")
                out = JobMessage(job_id, "progress", value=value)
            else:
                _, job_id, name, data, last, error = message
                if not (isinstance(name, str) and isinstance(data, (bytes, memoryview)) and isinstance(last, bool)
                        and (error is None or isinstance(error, str))):
                    raise TypeError("file fields")
                size = self.file_bytes.get(name, 0)
                if size < 0:  # this file was refused: ignore its remaining pieces
                    if last:
                        del self.file_bytes[name]
                    return
                size += len(data)
                limit = self.pool.max_send_file
                if size > limit and error is None:
                    error = f"file {name!r} is over this node's limit of {limit} bytes for files sent back"
                    data, last = b"", True
                    self.file_bytes[name] = -1  # the rest, if any, is dropped
                elif last:
                    self.file_bytes.pop(name, None)
                else:
                    self.file_bytes[name] = size
                out = JobMessage(job_id, "file", name=name, data=data, last=last, error=error)
        except (TypeError, ValueError):
            log.warning("worker %d sent a malformed %r message; ignored", self.pid, message[0])
            return
        if job_id != self.job_id or self.on_message is None:
            log.debug("worker %d: %s message for job %s that nobody awaits", self.pid, message[0], job_id)
            return
        try:
            self.on_message(out)
        except Exception:
            log.exception("handling a %s message of job %s failed", message[0], job_id)

    def on_channel_closed(self) -> None:
        # A worker closes its channel only by exiting; give it a moment to be seen exiting.
        self._timers.append(self.loop.call_later(1.0, self._kill_if_alive))

    def _kill_if_alive(self) -> None:
        if self.returncode is None and not self.exited.done():
            log.warning("worker %d closed its channel but did not exit; killing it", self.pid)
            self.kill()

    def on_process_exited(self) -> None:
        assert self.transport is not None
        self.returncode = self.transport.get_returncode()
        # Kill what its jobs left behind in its process group (orphans, or a grandchild
        # holding the channel open).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._timers.append(self.loop.call_later(EXIT_FLUSH_DELAY, self.finish))

    def finish(self) -> None:
        """The process exited and its pipes are closed (or the flush delay passed)."""
        if self.exited.done():
            return
        for timer in self._timers:
            timer.cancel()
        assert self.transport is not None
        if self.returncode is None:
            self.returncode = self.transport.get_returncode()
        behind, self.behind = self.behind, None
        if behind is not None:  # it never started: it runs elsewhere
            self.pool._give_back(behind)
        future, self.pending = self.pending, None
        if future is not None and not future.done():
            future.set_exception(_WorkerGone(self.returncode))
        self.exited.set_result(self.returncode)
        self.transport.close()
        self.pool._worker_exited(self)


class _ChannelReader(asyncio.Protocol):
    """The protocol of a worker's stdout pipe: data goes straight to ``_Worker.on_data``.

    asyncio's subprocess transport hands pipe data to the SubprocessProtocol through
    ``call_soon``: a loop turn between reading a worker's reply and handling it. Set on the
    pipe's transport in place of asyncio's own pipe protocol, this one handles the data in
    the read callback itself, and passes EOF and the pipe's loss on to asyncio's protocol, so
    the subprocess transport still sees its pipe close (pipe_connection_lost, then
    connection_lost once the process exited too)."""

    def __init__(self, worker: _Worker, inner: asyncio.BaseProtocol) -> None:
        self.worker = worker
        self.inner = inner
        # The worker's own method, not a method forwarding to it: no call of its own per read.
        self.data_received = worker.on_data  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:  # (replaced per instance, see __init__)
        self.worker.on_data(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if isinstance(self.inner, asyncio.Protocol) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


class _ReplyHook:
    """The reply slot of a job started by :meth:`WorkerPool.try_run`. It stands where
    ``_Worker.pending`` holds a future for a call, and ``_Worker.on_data`` / ``finish`` resolve
    it the same way (``done()``, ``set_result``, ``set_exception``); but it ends the job at
    once, in the callback that read the reply, instead of waking a task a loop turn later."""

    __slots__ = ("pool", "worker", "job", "start", "on_done", "_done")

    def __init__(self, pool: WorkerPool, worker: _Worker, job: WorkerJob, start: float,
                 on_done: Callable[[JobOutcome], None]) -> None:
        self.pool = pool
        self.worker = worker
        self.job = job
        self.start = start
        self.on_done = on_done
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, reply: tuple[Any, ...]) -> None:
        self._done = True
        self.pool._reply_ran(self, reply)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        pool, returncode = self.pool, getattr(exc, "returncode", None)
        if pool._state == "open":
            pool._start_task(pool._reply_lost(self, returncode))
        else:  # closing: no task may outlive aclose(), and its capture files go with it
            pool._end_lost(self, pool._lost_fields(self.worker, self.job, self.start, returncode, b"", b""))


class _QueuedHook(_ReplyHook):
    """The reply slot of a job started by :meth:`WorkerPool.try_queue`: written to a busy
    worker, it waits in ``_Worker.behind`` until the job before it ends, then takes its
    place in ``_Worker.pending`` (``on_start`` is called then). ``on_give_back`` is called
    instead if the worker exits before the job's turn (it never ran); ``skip_sent`` once the
    pool asked the worker not to run it."""

    __slots__ = ("on_start", "on_give_back", "on_message", "skip_sent")

    def __init__(self, pool: WorkerPool, worker: _Worker, job: WorkerJob, on_done: Callable[[JobOutcome], None],
                 on_start: Callable[[], None], on_give_back: Callable[[], None],
                 on_message: Callable[[JobMessage], None] | None) -> None:
        super().__init__(pool, worker, job, 0.0, on_done)
        self.on_start = on_start
        self.on_give_back = on_give_back
        self.on_message = on_message
        self.skip_sent = False


class _WorkerProtocol(asyncio.SubprocessProtocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.worker.attach(transport)  # type: ignore[arg-type]

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        if fd == 1:
            self.worker.on_data(data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if fd == 1:
            self.worker.on_channel_closed()

    def pause_writing(self) -> None:  # the stdin pipe's buffer is over its high-water mark
        self.worker.write_paused = True

    def resume_writing(self) -> None:
        self.worker.write_paused = False
        if self.worker.writer is not None:
            self.worker.writer.pump()

    def process_exited(self) -> None:
        self.worker.on_process_exited()

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.finish()
