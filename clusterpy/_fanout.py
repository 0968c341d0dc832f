"""The engine of ``clusterpy PROGRAM``: run one job per argument list, report each, sum up.

::

    main thread                                    JobCluster (loop + callback threads)
    -----------                                    -----------------------------------
    submit_job(args) for every job  ---------->    ships program + files, runs jobs
    loop: done queue (0.1 s ticks)  <-- callback   job ended
        JobRecord  -> retry (--retries) or sinks: terminal groups | --output-dir | --json
        tick       -> progress bar (rich), "no node joined" deadline
    KeyboardInterrupt / SIGTERM     ---------->    close(terminate=True): cancel queued,
                                                   terminate running on the nodes
    summary table, failed jobs named, exit status

How a job ended is decided by :func:`make_record` (a pure function of the finished job), so
the same words appear on the terminal, in ``--json`` and in ``--output-dir``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from .errors import ClusterError, JobTerminatedError
from .job import ClusterJob, JobStatus

__all__ = ["JobSpec", "JobRecord", "FanOutOptions", "make_record", "run_fanout"]

log = logging.getLogger("clusterpy.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM
_SHOWN_FAILURES = 10
_SLOWEST = 3


@dataclass(frozen=True)
class JobSpec:
    """One job to run: its number (1-based, input order) and its arguments."""

    number: int
    args: tuple[str, ...]

    @property
    def label(self) -> str:
        return shlex.join(self.args)


@dataclass
class JobRecord:
    """How one job ended. ``status``: exited (see ``exit_code``), timeout, killed, error,
    cancelled, lost (its node went away). ``ok`` only for exit code 0."""

    job: int
    args: list[str]
    status: str
    exit_code: int | None
    node: str | None
    hostname: str | None
    start_time: float | None
    end_time: float | None
    cpu_time: float
    attempts: int
    error: str | None
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "exited" and self.exit_code == 0

    def label(self) -> str:
        """The job's arguments as a shell would show them."""
        return shlex.join(self.args)

    @property
    def wall_time(self) -> float | None:
        if self.start_time is None or self.end_time is None:
            return None
        return max(0.0, self.end_time - self.start_time)

    @property
    def outcome(self) -> str:
        """Short words for humans: "exit 0", "timeout", "error: ..."."""
        if self.status == "exited":
            return f"exit {self.exit_code}"
        if self.status == "killed" and self.exit_code is not None and self.exit_code < 0:
            try:
                return f"killed by {signal.Signals(-self.exit_code).name}"
            except ValueError:
                pass
        return f"{self.status}: {self.error}" if self.status == "error" and self.error else self.status

    def as_json(self) -> dict[str, Any]:
        return {"job": self.job, "args": self.args, "ok": self.ok, "status": self.status,
                "exit_code": self.exit_code, "node": self.node, "hostname": self.hostname,
                "start_time": self.start_time, "end_time": self.end_time, "wall_time": self.wall_time,
                "cpu_time": self.cpu_time, "attempts": self.attempts, "error": self.error,
                "stdout": self.stdout, "stderr": self.stderr}


def make_record(job: ClusterJob, spec: JobSpec, attempts: int, node: str | None) -> JobRecord:
    """Classify a finished job (a program computation: its result is the exit code)."""
    exc = job.exception
    error = None if exc is None else (str(exc) or type(exc).__name__)
    exit_code = job.exit_code
    if job.status is JobStatus.Finished:
        status = "exited"
        if isinstance(job.result, int):
            exit_code = job.result
    elif job.status is JobStatus.Cancelled:
        status = "cancelled"
    elif job.status is JobStatus.Abandoned:
        status = "lost"
    elif isinstance(exc, JobTerminatedError) and "timeout" in str(exc):
        status = "timeout"
    elif isinstance(exc, JobTerminatedError) or type(exc).__name__ == "WorkerDiedError":
        status = "killed"
    else:  # the program could not be started (not executable, bad interpreter line, ...)
        status = "error"
        error = f"{type(exc).__name__}: {error}" if exc is not None else error
    return JobRecord(spec.number, list(spec.args), status, exit_code, node, job.hostname, job.start_time,
                     job.end_time, job.cpu_time or 0.0, attempts, error, job.stdout or "", job.stderr or "")


@dataclass
class FanOutOptions:
    """What ``clusterpy PROGRAM`` was asked to do (the parsed command line, checked)."""

    program: str
    fixed_args: list[str]
    files: list[str]
    nodes: list[str]
    local: bool | None
    discover: bool | None
    relays: list[str]
    cluster_name: str
    secret_file: str | None
    certfile: str | None
    keyfile: str | None
    cafile: str | None
    cpus_per_job: int
    timeout: float | None
    reentrant: bool
    retries: int
    output_dir: str | None
    json: bool
    quiet: bool
    dest_path: str | None
    connect_timeout: float
    monitor: bool | str = False  # JobCluster(monitor=): the web monitor


# ---------------------------------------------------------------- output


class _Screen:
    """Where text goes: straight to stdout/stderr, or through the live progress display
    (which redraws itself below the text) while it is on the terminal."""

    def __init__(self, progress: Any | None) -> None:
        self.progress = progress

    def write(self, text: str, stream: TextIO) -> None:
        if not text:
            return
        if self.progress is not None and stream.isatty():
            self.progress.console.print(text, end="" if text.endswith("\n") else "\n", markup=False,
                                        highlight=False, emoji=False, soft_wrap=True)
        else:
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()


class _Progress:
    """A rich progress bar on stderr (done/total, running, failed, rate, ETA), or nothing."""

    def __init__(self, total: int, title: str, enabled: bool) -> None:
        self.bar: Any = None
        self._task: Any = None
        self._running = -1
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                speed = task.finished_speed or task.speed
                return Text("-- jobs/s" if speed is None else f"{speed:.1f} jobs/s", style="progress.data.speed")

        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("[green]{task.fields[ok]} ok[/] [red]{task.fields[failed]} failed[/] "
                       "[cyan]{task.fields[running]} running[/]"),
            RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), transient=False, refresh_per_second=8,
        )
        self._task = self.bar.add_task(title, total=total, ok=0, failed=0, running=0)
        self.bar.start()

    def update(self, *, ok: int, failed: int, running: int) -> None:
        if self.bar is not None:
            self.bar.update(self._task, completed=ok + failed, ok=ok, failed=failed, running=running)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Sinks:
    """Each finished job's report: grouped on the terminal, files in --output-dir, --json lines."""

    def __init__(self, opts: FanOutOptions, total: int, screen: _Screen) -> None:
        self.opts = opts
        self.screen = screen
        self.width = len(str(total))
        self.jsonl: TextIO | None = None
        if opts.output_dir:
            os.makedirs(opts.output_dir, exist_ok=True)
            self.jsonl = open(os.path.join(opts.output_dir, "jobs.jsonl"), "w", encoding="utf-8")

    def job(self, rec: JobRecord) -> None:
        if self.opts.json:
            self.screen.write(json.dumps(rec.as_json()), sys.stdout)
        if self.opts.output_dir:
            self._files(rec)
        if not self.opts.json and not self.opts.output_dir:
            self._group(rec)
        elif not rec.ok and not self.opts.quiet:
            self.screen.write(f"clusterpy: job {rec.job} [{rec.label()}] on {rec.node or '?'}: {rec.outcome}", sys.stderr)

    def _group(self, rec: JobRecord) -> None:
        """Like tail(1) with several files: a header, then the job's output, kept together."""
        took = f", {rec.wall_time:.2f}s" if rec.wall_time is not None else ""
        header = f"==> job {rec.job} [{rec.label()}] on {rec.node or '?'}: {rec.outcome}{took} <=="
        self.screen.write(header + "\n" + rec.stdout, sys.stdout)
        if rec.stderr:
            self.screen.write(f"==> job {rec.job} [{rec.label()}] stderr <==\n" + rec.stderr, sys.stderr)

    def _files(self, rec: JobRecord) -> None:
        """DIR/<n>.stdout, DIR/<n>.stderr, DIR/<n>.exit (the exit code, or how it ended), jobs.jsonl."""
        assert self.opts.output_dir is not None and self.jsonl is not None
        base = os.path.join(self.opts.output_dir, f"{rec.job:0{self.width}d}")
        for suffix, text in ((".stdout", rec.stdout), (".stderr", rec.stderr),
                             (".exit", f"{rec.exit_code if rec.status == 'exited' else rec.status}\n")):
            with open(base + suffix, "w", encoding="utf-8") as f:
                f.write(text)
        record = rec.as_json()
        del record["stdout"], record["stderr"]
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()


# ---------------------------------------------------------------- summary


def summarize(records: list[JobRecord], total: int, elapsed: float, quiet: bool, interrupted: bool) -> None:
    """Per-node table and the slowest jobs (unless quiet), then the failed jobs, on stderr."""
    failed = [r for r in records if not r.ok]
    if not quiet and records:
        from rich.console import Console
        from rich.table import Table

        # Not a terminal: wide enough that a log file or a pipe gets whole lines, not "…".
        console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
        by_node: dict[str, list[JobRecord]] = {}
        for rec in records:
            by_node.setdefault(rec.node or "(no node)", []).append(rec)
        table = Table(title="clusterpy: jobs per node", title_justify="left")
        for name, justify in (("Node", "left"), ("Host", "left"), ("Jobs", "right"), ("Failed", "right"),
                              ("CPU s", "right"), ("Wall s", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        for node, recs in sorted(by_node.items()):
            table.add_row(node, recs[0].hostname or "", str(len(recs)), str(sum(not r.ok for r in recs)),
                          f"{sum(r.cpu_time for r in recs):.2f}", f"{sum(r.wall_time or 0 for r in recs):.2f}")
        console.print(table)
        timed = sorted((r for r in records if r.wall_time is not None), key=lambda r: -(r.wall_time or 0))
        if len(timed) > 1:
            slow = Table(title="slowest jobs", title_justify="left")
            for name in ("Job", "Args", "Node", "Wall s", "Result"):
                slow.add_column(name)
            for r in timed[:_SLOWEST]:
                slow.add_row(str(r.job), r.label(), r.node or "", f"{r.wall_time:.2f}", r.outcome)
            console.print(slow)
        console.print(f"{len(records)} of {total} jobs ran in {elapsed:.1f}s: "
                      f"{len(records) - len(failed)} ok, {len(failed)} failed", markup=False)
    if interrupted:
        print(f"clusterpy: interrupted: {len(records)} of {total} jobs finished "
              f"({len(records) - len(failed)} ok); the others were cancelled", file=sys.stderr)
    if failed:
        names = "; ".join(f"job {r.job} [{r.label()}]: {r.outcome}" for r in failed[:_SHOWN_FAILURES])
        more = f"; and {len(failed) - _SHOWN_FAILURES} more" if len(failed) > _SHOWN_FAILURES else ""
        print(f"clusterpy: {len(failed)} of {total} jobs failed: {names}{more}", file=sys.stderr)


# ---------------------------------------------------------------- the run


class _Stop(Exception):
    """SIGTERM arrived: stop like Ctrl-C, with the SIGTERM exit status."""


def run_fanout(opts: FanOutOptions, specs: list[JobSpec]) -> int:
    """Run every job, report each as it ends, print the summary; return the exit status.

    0: every job exited 0; 1: some job failed (named on stderr) or no node could be used;
    130 (Ctrl-C) / 143 (SIGTERM): stopped, running jobs terminated on their nodes.

    Raises:
        ClusterError: the cluster cannot be set up (no secret, unshippable file, ...).
    """
    from .client import JobCluster  # here: `clusterpy --help` need not load the client
    done: queue.SimpleQueue[ClusterJob] = queue.SimpleQueue()
    started = time.monotonic()

    def on_term(signum: int, frame: object) -> None:
        raise _Stop()

    old_term = signal.signal(signal.SIGTERM, on_term)
    cluster = None
    progress = _Progress(len(specs), os.path.basename(opts.program),
                         enabled=not opts.quiet and sys.stderr.isatty())
    screen = _Screen(progress.bar)
    sinks = _Sinks(opts, len(specs), screen)
    records: list[JobRecord] = []
    pending: dict[ClusterJob, tuple[JobSpec, int]] = {}
    node_names: dict[str, str] = {}
    exit_status: int | None = None
    try:
        cluster = JobCluster(
            opts.program, nodes=opts.nodes or None, depends=opts.files, callback=done.put,
            secret_file=opts.secret_file, local=opts.local, reentrant=opts.reentrant,
            discover=opts.discover, relays=opts.relays, cluster_name=opts.cluster_name,
            certfile=opts.certfile, keyfile=opts.keyfile, cafile=opts.cafile,
            timeout=opts.timeout, cpus_per_job=opts.cpus_per_job, dest_path=opts.dest_path,
            monitor=opts.monitor,
        )

        def submit(spec: JobSpec, attempt: int) -> None:
            job = cluster.submit_job((*opts.fixed_args, *spec.args), job_id=spec.number)
            pending[job] = (spec, attempt)

        for spec in specs:
            submit(spec, 1)
        joined = False
        ok = failed = running = 0
        next_check = counted = 0.0
        while pending:
            try:
                job: ClusterJob | None = done.get(timeout=0.1)
            except queue.Empty:
                job = None
            now = time.monotonic()
            if job is not None:
                joined = True
                spec, attempt = pending.pop(job)
                if job.node_id is not None and job.node_id not in node_names:
                    node_names.update({n["node_id"]: n["name"] for n in cluster.nodes()})
                rec = make_record(job, spec, attempt, node_names.get(job.node_id or "", job.ip_addr))
                if not rec.ok and rec.status != "cancelled" and attempt <= opts.retries:
                    if not opts.quiet:
                        screen.write(f"clusterpy: job {rec.job} [{rec.label()}] on {rec.node or '?'}: "
                                     f"{rec.outcome}; retrying ({attempt} of {opts.retries} retries)", sys.stderr)
                    submit(spec, attempt + 1)
                else:
                    records.append(rec)
                    ok, failed = ok + rec.ok, failed + (not rec.ok)
                    sinks.job(rec)
            elif not joined and now >= next_check:
                joined = bool(cluster.nodes())
                next_check = now + 0.5
                if not joined and now - started > opts.connect_timeout:
                    where = ", ".join(opts.nodes) or "the local node"
                    print(f"clusterpy: no node joined within {opts.connect_timeout:g}s (tried {where}); "
                          "is clusterpy-node running there, with the same secret?", file=sys.stderr)
                    exit_status = EXIT_FAILED
                    break
            if progress.bar is not None:
                if now - counted >= 0.1:  # a scan of the pending jobs, so at most ten a second
                    running, counted = sum(1 for j in pending if j.status is JobStatus.Running), now
                progress.update(ok=ok, failed=failed, running=running)
    except KeyboardInterrupt:
        exit_status = EXIT_INTERRUPTED
    except _Stop:
        exit_status = EXIT_TERMINATED
    finally:
        signal.signal(signal.SIGTERM, old_term)
        progress.stop()
        if cluster is not None:
            stopping = exit_status is not None
            if stopping and pending:
                print(f"clusterpy: cancelling {len(pending)} unfinished jobs", file=sys.stderr)
            try:
                cluster.close(terminate=stopping)
            except KeyboardInterrupt:
                # A second Ctrl-C: stop waiting. The cancellations went out as close() began.
                exit_status = EXIT_INTERRUPTED
            except (ClusterError, OSError, TimeoutError) as exc:
                log.warning("closing the cluster: %s", exc)
        sinks.close()
    interrupted = exit_status in (EXIT_INTERRUPTED, EXIT_TERMINATED)
    summarize(sorted(records, key=lambda r: r.job), len(specs), time.monotonic() - started, opts.quiet, interrupted)
    if exit_status is not None:
        return exit_status
    return EXIT_OK if all(r.ok for r in records) else EXIT_FAILED
