"""The worker process of a node's pool: loads computations once, then runs their jobs.

:mod:`clusterpy.pool` starts one of these per CPU as ``python -m clusterpy.worker
CAPTURE_DIR PARENT_PID`` in a new session (so its process group holds every process a
job starts). Nobody else should start it.

Data flow::

    pool (asyncio, in the node)                     worker (this module, synchronous)
    ───────────────────────────                     ─────────────────────────────────
    stdin pipe  ──── frame(command) ──────────────▶ fd 0, dup'd to a private fd at start
    stdout pipe ◀─────────── frame(reply) ───────── fd 1, dup'd to a private fd at start
                                                    fds 0, 1, 2 then point at /dev/null;
                                                    during a job fds 1, 2 point at
                                                    CAPTURE_DIR/<pid>.out and .err

    frame = 4-byte big-endian length + pickle of a tuple of builtins (str, bytes, dict...),
            written in one write (clusterpy._channel)

Commands and replies (exactly one reply per command, except ``exit``)::

    ("load", comp_id, kind, workdir, bundle, program, env)  ->  ("loaded", comp_id, error | None)
    ("run", job_id, comp_id, args[, options])               ->  ("done", (JobOutcome fields))
                                (options None or left out: those of the previous run; the
                                fields in JobOutcome's order, see _workjob.outcome_from_reply)
    ("next", job_id, comp_id, args[, options])              ->  ("done", ...) or ("skipped", job_id)
                                (a run the pool wrote while the job before it still ran;
                                skipped if a ("skip", job_id) is in the pipe when it is
                                reached; a later skip is ignored: the job has run)
    during a run, unasked (clusterpy.progress)              ->  ("progress", job_id, value_bytes)
                                                                ("file", job_id, name, data, last, error)
    ("unload", comp_id)                                     ->  ("unloaded", comp_id, error | None)
    ("exit",)                                               ->  (cleanups run, process exits 0)
    at start-up, unasked                                    ->  ("ready", pid)

User data (bundle, args, results, exceptions) crosses the channel only as opaque
cloudpickle ``bytes``; the pool unpickles the frames with an unpickler that refuses
every class, so nothing a job returns is ever unpickled in the node.

Because the private channel fds are the only way back to the pool, nothing a job writes
(``print``, C-level ``write(1, ...)``, child processes) can corrupt the channel. Output
files are named after the worker's pid so that the pool can still collect the output
(including the faulthandler traceback of a segfault) of a job whose worker died. The two
files are kept open and emptied from job to job; they are replaced by fresh files only when
a process that a job started may still hold them (see :class:`clusterpy._capture.Output`),
so that such a process never writes into a later job's output.

Inside a job, :data:`current_job_id` is the id of the job being run (``None`` between
jobs): ``import clusterpy.worker; clusterpy.worker.current_job_id``. :mod:`clusterpy.progress`
sends provisional results and files through :data:`job_send` while a job runs. The run
``options`` (from the node): ``max_file`` (bytes a sent file may have), ``slowdown`` (a factor:
the worker waits after each job so that it takes that many times as long) and ``fault``
(``"corrupt-results"``: results are altered), the last two being testing aids only.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from typing import Any

from . import _userdata
from ._capture import OUTPUT_CAP, Output, output_base, read_capped
from ._channel import MAX_FRAME, ChannelReader, FrameDecoder, encode_frame, write_all
from ._malloc import tune_malloc

__all__ = ["current_job_id", "encode_frame", "FrameDecoder", "read_capped", "OUTPUT_CAP", "main"]

#: Id of the job this process is running now, ``None`` between jobs.
current_job_id: str | None = None
#: While a job runs: sends one unasked message to the pool (clusterpy.progress uses it).
job_send: Any = None
#: While a job runs: the node's options for it (see the module docstring).
job_options: dict[str, Any] = {}

#: A pickled result larger than this is reported as an exception (room left for the rest of the frame).
MAX_RESULT = MAX_FRAME - 2 * OUTPUT_CAP - (1 << 20)
#: A pickled exception larger than this is dropped (its type, message and traceback still travel).
MAX_EXCEPTION = 1 << 20

#: Results of these types are pickled with the standard pickler (no cloudpickle needed: they
#: never refer to code), which costs a tenth of cloudpickle's per call.
_PLAIN_RESULTS = (int, float, bool, type(None))
_PLAIN_MAX = 64 * 1024  # ... and str/bytes up to this length (pickle.dumps is slow for large ones)

#: The exception fields of a JobOutcome (exception, exc_type, exc_message, traceback).
_ErrorFields = tuple[bytes | None, str | None, str | None, str | None]
_NO_ERROR: _ErrorFields = (None, None, None, None)


# ---------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------


class _Computation:
    __slots__ = ("comp_id", "kind", "workdir", "program", "env", "compute", "cleanup",
                 "setup_error", "setup_output", "only_if", "return_files")

    def __init__(self, comp_id: str, kind: str, workdir: str, program: list[str] | None,
                 env: dict[str, str] | None) -> None:
        self.comp_id = comp_id
        self.kind = kind
        self.workdir = workdir
        self.program = program
        self.env = env or {}
        self.compute = None
        self.cleanup = None
        self.setup_error: _ErrorFields | None = None
        self.setup_output: tuple[bytes, bytes] = (b"", b"")
        self.only_if = None  # a predicate: results it rejects are dropped here (clusterpy.progress.DROPPED)
        self.return_files = False  # run each job in a private directory; send back what it makes


class _Worker:
    def __init__(self, chan_in: int, chan_out: int, capture_dir: str, devnull: int) -> None:
        self.reader = ChannelReader(chan_in)
        self.chan_out = chan_out
        self.output = Output(output_base(capture_dir, os.getpid()), devnull)
        self.comps: dict[str, _Computation] = {}
        self.options: dict[str, Any] = {}
        self._slowdown = 1.0  # options["slowdown"] as a float, parsed once per change of options
        self._cloudpickle = None
        self._send_lock = threading.Lock()

    # -- channel -----------------------------------------------------------------------

    def send(self, message: tuple[object, ...], size_hint: int = -1) -> None:
        """Send ``message`` to the pool; ``size_hint``: see encode_frame (-1: work it out)."""
        frame = encode_frame(message, _size_hint(message) if size_hint < 0 else size_hint)
        # A job's threads may send (clusterpy.progress) while the main thread does: one frame at a time.
        with self._send_lock:
            write_all(self.chan_out, frame)

    def serve(self) -> None:
        self.send(("ready", os.getpid()))
        try:
            while True:
                command = self.reader.receive()
                if command is None or command[0] == "exit":
                    break
                op = command[0]
                if op == "run" or op == "next":
                    # A "next" was sent while the job before it ran: it may have been called off.
                    if op == "next" and self.reader.take_skip(command[1]):
                        self.send(("skipped", command[1]))
                        continue
                    fields = self.run(*command[1:])
                    self.send(("done", fields), _reply_size(fields))
                elif op == "skip":
                    pass  # for a job that had started already: its reply says how it ended
                elif op == "load":
                    self.send(("loaded", command[1], self.load(*command[1:])))
                elif op == "unload":
                    self.send(("unloaded", command[1], self.unload(command[1])))
                else:
                    raise ValueError(f"unknown command {op!r}")
            for comp_id in list(self.comps):
                self.unload(comp_id)
        finally:
            self.output.close()

    @property
    def cloudpickle(self):  # type: ignore[no-untyped-def]
        # Imported on first use: it is most of the worker's start-up time otherwise.
        if self._cloudpickle is None:
            import cloudpickle

            self._cloudpickle = cloudpickle
        return self._cloudpickle

    # -- commands ----------------------------------------------------------------------

    def load(self, comp_id: str, kind: str, workdir: str, bundle: bytes | None,
             program: list[str] | None, env: dict[str, str] | None) -> str | None:
        """Unpickle the computation and run its setup; return the error message, if any."""
        comp = _Computation(comp_id, kind, workdir, program, env)
        self.comps[comp_id] = comp
        if workdir not in sys.path:
            sys.path.insert(0, workdir)
        with self.output as capture, _Environ(comp.env), _Cwd(workdir):
            try:
                if kind == "function":
                    self.cloudpickle  # noqa: B018 -- make sure cloudpickle's reducers are importable
                    parts = pickle.loads(bundle)  # type: ignore[arg-type]
                    comp.compute = parts["compute"]
                    comp.cleanup = parts.get("cleanup")
                    comp.only_if = parts.get("only_if")
                    comp.return_files = bool(parts.get("return_files"))
                    setup = parts.get("setup")
                    _inject(parts.get("depends") or (), (comp.compute, setup, comp.cleanup))
                    if setup is not None:
                        status = setup(*tuple(parts.get("setup_args") or ()))
                        # dispy's contract: setup returns 0 (or None here) on success.
                        if status not in (None, 0):
                            raise RuntimeError(f"setup returned {status!r} (expected None or 0)")
                elif kind == "program":
                    if not program:
                        raise ValueError("a program computation needs a non-empty program argv")
                    if bundle:  # only_if / return_files (clusterpy.progress)
                        self.cloudpickle  # noqa: B018
                        parts = pickle.loads(bundle)
                        comp.only_if = parts.get("only_if")
                        comp.return_files = bool(parts.get("return_files"))
                else:
                    raise ValueError(f"unknown computation kind {kind!r}")
            except BaseException as exc:  # noqa: BLE001 -- any failure, SystemExit included, fails the setup
                comp.setup_error = self._describe(exc, skip=1)
        if comp.setup_error is None:
            capture.discard()
            return None
        comp.setup_output = capture.read()
        return comp.setup_error[2]

    def unload(self, comp_id: str) -> str | None:
        """Run the computation's cleanup (if its setup succeeded) and drop it."""
        comp = self.comps.pop(comp_id, None)
        if comp is None:
            return None
        error = None
        if comp.cleanup is not None and comp.setup_error is None:
            with _Environ(comp.env), _Cwd(comp.workdir):
                try:
                    comp.cleanup()
                except BaseException as exc:  # noqa: BLE001
                    error = self._describe(exc)[3]
            self.output.recount()  # what the cleanup's child processes used is no job's CPU
        if not any(c.workdir == comp.workdir for c in self.comps.values()):
            while comp.workdir in sys.path:
                sys.path.remove(comp.workdir)
            prefix = os.path.join(comp.workdir, "")
            remote = sys.modules.get("clusterpy._remote")
            if remote is not None:  # scattered objects this worker loaded for the computation
                remote.forget_workdir(os.path.realpath(comp.workdir))
            for name, module in list(sys.modules.items()):
                if (getattr(module, "__file__", None) or "").startswith(prefix):
                    del sys.modules[name]
        return error

    def run(self, job_id: str, comp_id: str, args: bytes,
            options: dict[str, Any] | None = None) -> tuple[object, ...]:
        """Run one job; return the fields of its JobOutcome, in their order. Never raises for
        the job's faults.

        ``options``: see the module docstring (``max_file``, ``slowdown``, ``fault``); None:
        those of the previous run."""
        global current_job_id, job_send, job_options
        if options is not None:
            self.options = options
            self._slowdown = float(options.get("slowdown") or 1.0)
        options = self.options
        comp = self.comps.get(comp_id)
        if comp is None or comp.setup_error is not None:
            now = time.time()
            error: _ErrorFields | None
            if comp is None:
                error = self._describe(LookupError(f"computation {comp_id!r} is not loaded in this worker"))
                status, output = "exception", (b"", b"")
            else:
                error, status, output = comp.setup_error, "setup_failed", comp.setup_output
            assert error is not None
            return (job_id, status, None, *error, output[0], output[1], now, now, 0.0, None)

        if sys.path[0] != comp.workdir:
            if comp.workdir in sys.path:
                sys.path.remove(comp.workdir)
            sys.path.insert(0, comp.workdir)
        status, exit_code = "finished", None
        result: _userdata.Payload | None = None
        error = _NO_ERROR
        environ = _Environ(comp.env) if comp.env else None  # most computations set none
        with self.output as capture:
            if environ is not None:
                environ.__enter__()
            try:
                # Every time, even if the last job ran here: a job may have left the directory.
                os.chdir(comp.workdir)
                current_job_id = job_id
                job_send, job_options = self.send, dict(options)  # a job may not change the next one's
                start, cpu_start = time.time(), time.process_time()
                private = None
                try:
                    if comp.return_files:
                        from . import progress

                        private = progress.private_dir(comp.workdir, job_id)
                        os.chdir(private)
                    call_args, call_kwargs = _userdata.loads(args)
                    # An executor call or a map chunk (clusterpy._remote) decides how to call;
                    # the module is loaded only if the arguments referred to it.
                    remote = sys.modules.get("clusterpy._remote")
                    if remote is not None and call_args and isinstance(call_args[0], remote.Invocation):
                        value = call_args[0].invoke(lambda *a, **k: self._call(comp, a, k), call_args[1:], call_kwargs)
                    elif comp.kind == "program":
                        value = exit_code = _run_program(comp, call_args, call_kwargs)
                    else:
                        value = comp.compute(*call_args, **call_kwargs)  # type: ignore[misc]
                    if comp.only_if is not None or options.get("fault"):
                        value = self._filter(comp, value, call_args, options)
                except BaseException as exc:  # noqa: BLE001 -- SystemExit/KeyboardInterrupt end the job, not the worker
                    status, error = "exception", self._describe(exc, skip=1)
                finally:
                    if private is not None:  # return_files: what the job made, before its result
                        os.chdir(comp.workdir)
                        progress.return_made_files(self.send, job_id, private,
                                                   int(options.get("max_file", progress.DEFAULT_MAX_SEND_FILE)))
                    current_job_id, job_send, job_options = None, None, {}
                if status == "finished":
                    result, pickle_error = self._pickle_result(value)
                    if pickle_error is not None:
                        status, error = "exception", pickle_error
                    del value
                cpu = time.process_time() - cpu_start  # the job's own CPU (all threads)
                end = time.time()
                if self._slowdown > 1.0:  # --slowdown (a testing aid): this job takes `slowdown` times as long
                    time.sleep((self._slowdown - 1.0) * (end - start))
                    end = time.time()
            finally:  # even if the job's directory or its files fail us
                if environ is not None:
                    environ.__exit__()
        stdout, stderr = capture.read()
        # ... and that of the child processes it waited for (known once the capture ended).
        return (job_id, status, result, *error, stdout, stderr, start, end, cpu + capture.children_cpu, exit_code)

    # -- helpers -----------------------------------------------------------------------

    @staticmethod
    def _filter(comp: _Computation, value: object, call_args: tuple[object, ...], options: dict[str, Any]) -> object:
        """Apply the injected fault (a testing aid) and ``only_if`` to a job's result, per item for a map chunk."""
        from . import progress

        remote = sys.modules.get("clusterpy._remote")
        chunk = remote is not None and bool(call_args) and isinstance(call_args[0], remote.Chunk)
        if options.get("fault") == "corrupt-results":
            value = progress.corrupt(value)
        if comp.only_if is not None:
            value = progress.keep_only_if(value, comp.only_if, items=chunk)
        return value

    @staticmethod
    def _call(comp: _Computation, args: tuple[object, ...], kwargs: dict[str, object]) -> object:
        """Call the computation itself (for a map chunk of the cluster's computation)."""
        if comp.kind == "program":
            return _run_program(comp, args, kwargs)
        return comp.compute(*args, **kwargs)  # type: ignore[misc]

    def _pickle_result(self, value: object) -> tuple[_userdata.Payload | None, _ErrorFields | None]:
        cause: BaseException | None
        kind = type(value)
        if kind in _PLAIN_RESULTS or ((kind is str or kind is bytes) and len(value) <= _PLAIN_MAX):  # type: ignore[arg-type]
            return pickle.dumps(value, protocol=5), None
        try:
            # Large buffers (NumPy arrays, large bytes) out of band: views of the result itself,
            # sent before the next job starts.
            blob = _userdata.dumps(value, self.cloudpickle.dumps)
        except BaseException as exc:  # noqa: BLE001
            cause = exc
            problem = f"could not be pickled: {type(exc).__name__}: {exc}"
        else:
            size = _userdata.size(blob)
            if size <= MAX_RESULT:
                return blob, None
            cause, problem = None, f"is too large to send back ({size} bytes pickled)"
        error = pickle.PicklingError(f"the job's result ({type(value).__qualname__}) {problem}")
        try:
            raise error from cause
        except pickle.PicklingError as exc:
            return None, self._describe(exc)

    def _describe(self, exc: BaseException, skip: int = 0) -> _ErrorFields:
        """Return the exception fields of a JobOutcome for ``exc`` (exception, exc_type,
        exc_message, traceback); ``skip`` drops our own frames."""
        import traceback

        tb = exc.__traceback__
        for _ in range(skip):
            if tb is not None and tb.tb_next is not None:
                tb = tb.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        try:
            message = str(exc)
        except BaseException:  # noqa: BLE001 -- a broken __str__ must not kill the worker
            message = f"<unprintable {type(exc).__name__}>"
        blob: bytes | None
        try:
            blob = self.cloudpickle.dumps(exc)
            if len(blob) > MAX_EXCEPTION:
                blob = None
        except BaseException:  # noqa: BLE001 -- unpicklable exceptions travel as text only
            blob = None
        return (blob, type(exc).__name__, message, text)


def _size_hint(message: tuple[object, ...]) -> int:
    """Bytes held by ``message``'s ``bytes`` and user payloads (at its top level): which way
    encode_frame should pickle it."""
    size = 0
    for item in message:
        if isinstance(item, (bytes, memoryview, tuple)):
            size += _userdata.size(item)
    return size


def _reply_size(fields: tuple[Any, ...]) -> int:
    """:func:`_size_hint` of a "done" reply's fields: only result, exception, stdout and
    stderr can be large (the rest are short strings and numbers), so only they are counted."""
    result, exception = fields[2], fields[3]
    size = len(fields[7]) + len(fields[8])
    if exception is not None:
        size += len(exception)
    if result is not None:
        size += len(result) if type(result) is bytes else _userdata.size(result)
    return size


def _run_program(comp: _Computation, args: tuple[object, ...], kwargs: dict[str, object]) -> int:
    import subprocess

    if kwargs:
        raise TypeError(f"a program computation takes no keyword arguments (got {sorted(kwargs)})")
    argv = list(comp.program or ()) + [str(a) for a in args]
    # stdout/stderr are inherited: fds 1 and 2 are this job's capture files.
    # The job's cwd: the computation's directory, or a return_files job's private one.
    return subprocess.run(argv, cwd=os.getcwd(), stdin=subprocess.DEVNULL, check=False).returncode


def _inject(depends: object, functions: tuple[object, ...]) -> None:
    """Bind each dependency under its ``__name__`` in the globals of the computation's functions."""
    from types import ModuleType

    namespaces = {}
    for fn in functions:
        namespace = getattr(fn, "__globals__", None)
        if isinstance(namespace, dict):
            namespaces[id(namespace)] = namespace
    for obj in depends:  # type: ignore[attr-defined]
        if isinstance(obj, ModuleType):
            name = obj.__name__.partition(".")[0]  # `import a.b` binds `a`
            obj = sys.modules.get(name, obj)
        else:
            name = obj.__name__
        for namespace in namespaces.values():
            namespace[name] = obj


class _Environ:
    """Apply a computation's environment variables for the duration of a call."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def __enter__(self) -> None:
        self.saved = {key: os.environ.get(key) for key in self.env}
        if self.env:
            os.environ.update(self.env)

    def __exit__(self, *exc_info: object) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Cwd:
    """Enter ``path`` for a call. The worker stays there afterwards (the next call most
    likely needs the same directory): one ``chdir`` per call instead of two."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> None:
        os.chdir(self.path)

    def __exit__(self, *exc_info: object) -> None:
        pass


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us if the node dies, so a killed node leaves no busy workers behind."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 == PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 -- best effort; EOF on the channel still stops an idle worker
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Run the worker loop; ``argv`` is ``[CAPTURE_DIR, PARENT_PID]``. Returns the exit status."""
    capture_dir, parent_pid = (sys.argv[1:] if argv is None else argv)[:2]
    # The channel moves to private (close-on-exec) fds; 0, 1 and 2 become /dev/null so that
    # nothing a job reads or writes through them can touch the channel.
    chan_in, chan_out, diag = os.dup(0), os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # prints reach the file before a crash
    import faulthandler

    faulthandler.enable()  # writes to fd 2, i.e. the running job's stderr file
    _die_with_parent(int(parent_pid))
    tune_malloc()
    worker = _Worker(chan_in, chan_out, capture_dir, devnull)
    try:
        worker.serve()
    except BrokenPipeError:
        return 0  # the pool went away
    except BaseException:
        import traceback

        os.write(diag, f"clusterpy.worker {os.getpid()}: internal error\n{traceback.format_exc()}".encode())
        return 70
    return 0


if __name__ == "__main__":
    # Run main() in the importable module, not in __main__, so that jobs see the live
    # `clusterpy.worker.current_job_id`.
    from clusterpy import worker as _worker

    sys.exit(_worker.main())
