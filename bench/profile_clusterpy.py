#!/usr/bin/env python3
"""Where clusterpy's time goes on workloads A (throughput), B (latency) and C (1 MB payloads).

Usage: ``python bench/profile_clusterpy.py [--jobs 5000] [--calls 200] [--out DIR]``

The views, written to DIR (default ``$TMPDIR/clusterpy-profile``) and summarised on stdout:

0. CPU time per job of each process (client, node, each worker) and system calls per job
   (``strace -c``, if installed), for A and C, with no profiler in the way.
1. cProfile of the client: the user's thread (submit, wait) and the cluster's event-loop
   thread (entered through the loop, so every callback there is counted) as separate tables.
2. cProfile of the node: ``clusterpy-node`` run under ``python -m cProfile``.
3. py-spy (sampling, all threads and the worker processes) of client and node together, if
   ``py-spy`` is installed: self time per function, which cProfile's per-call overhead skews
   for tiny functions.
4. For B, where a round trip's time goes, from each job's timestamps (all processes share
   the clock): submit -> worker start, worker run, worker end -> result in the user's hands.

The script reaches into ``JobCluster._loop`` to profile the loop thread: it is a diagnostic
tool, not an example of the public API.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchjobs  # noqa: E402
from frameworks import SECRET, _stop_process  # noqa: E402


def start_node(out: str, profiled: bool) -> tuple[subprocess.Popen[bytes], str]:
    prefix = [sys.executable, "-m", "cProfile", "-o", os.path.join(out, "node.prof")] if profiled else [sys.executable]
    proc = subprocess.Popen(
        [*prefix, "-m", "clusterpy.node", "--host", "127.0.0.1", "--port", "0", "--cpus", "2",
         "--dest-path", os.path.join(out, "node-files"), "--log-level", "WARNING"],
        stdout=subprocess.PIPE, env={**os.environ, "CLUSTERPY_SECRET": SECRET},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    match = re.search(r"listening on ([\d.]+):(\d+)", line)
    if not match:
        _stop_process(proc)
        raise SystemExit(f"node did not start: {line!r}")
    return proc, f"{match[1]}:{match[2]}"


def top(stats_file: str, n: int, title: str) -> str:
    buf = io.StringIO()
    st = pstats.Stats(stats_file, stream=buf)
    st.sort_stats("tottime").print_stats(n)
    body = buf.getvalue()
    body = body[body.find("   ncalls"):] if "   ncalls" in body else body
    total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
    return f"### {title} (self time, total {total:.2f} s)\n\n```\n{body.rstrip()}\n```\n"


def run_a(cluster, jobs: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    handles = [cluster.submit(i) for i in range(jobs)]
    assert [h() for h in handles] == [i + 1 for i in range(jobs)]
    return jobs / (time.perf_counter() - start)


def run_b(cluster, calls: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    hops: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(calls):
        t0 = time.time()
        job = cluster.submit(i)
        assert job() == i + 1
        t1 = time.time()
        hops["total"].append(t1 - t0)
        if job.start_time and job.end_time:
            hops["submit -> job starts in the worker"].append(job.start_time - t0)
            hops["job runs in the worker"].append(job.end_time - job.start_time)
            hops["job ends -> result in the user's thread"].append(t1 - job.end_time)
    return {k: statistics.median(v) * 1e3 for k, v in hops.items()}


def profile_client(address: str, out: str, jobs: int, calls: int) -> tuple[float, dict[str, float]]:
    from clusterpy.client import JobCluster

    cluster = JobCluster(benchjobs.inc, nodes=[address], secret=SECRET)
    try:
        for i in range(200):  # warm up: connections, worker loading, caches
            cluster.submit(i)()
        ready = threading.Event()
        loop = cProfile.Profile()

        def toggle(on: bool) -> None:
            loop.enable() if on else loop.disable()
            ready.set()

        results = {}
        for name in ("A", "B"):
            main, loop = cProfile.Profile(), cProfile.Profile()
            ready.clear()
            cluster._loop.call_soon_threadsafe(toggle, True)
            ready.wait()
            main.enable()
            results[name] = run_a(cluster, jobs) if name == "A" else run_b(cluster, calls)
            main.disable()
            ready.clear()
            cluster._loop.call_soon_threadsafe(toggle, False)
            ready.wait()
            main.dump_stats(os.path.join(out, f"client-{name}-user-thread.prof"))
            loop.dump_stats(os.path.join(out, f"client-{name}-loop-thread.prof"))
        return results["A"], results["B"]  # type: ignore[return-value]
    finally:
        cluster.close()


# Innermost frames that mean "waiting", not working: a blocked read or poll that py-spy
# did not recognise as idle.
_WAITING = ("EpollSelector.select", "_Worker._read_exact", "Condition.wait", "Event.wait",
            "ThreadedChildWatcher._do_waitpid", "_worker (concurrent/futures/thread.py")


def _who(frames: list[str], default: str) -> tuple[str, list[str]]:
    """Name the process and thread a raw py-spy stack belongs to; return it and the Python frames."""
    procs = [f for f in frames if f.startswith("process ")]
    rest = [f for f in frames if not f.startswith("process ")]
    cmd = procs[-1] if procs else default
    name = ("worker" if "clusterpy.worker" in cmd else "node" if "clusterpy.node" in cmd
            else default if cmd == default else cmd[:60])
    thread = rest[0].split(":", 1)[-1].strip() if rest and rest[0].startswith("thread ") else ""
    if rest and rest[0].startswith("thread "):
        rest = rest[1:]
    return f"{name} {thread}".strip(), rest


def pyspy_summary(raw_file: str, n: int, default: str) -> str:
    """Busy samples per process/thread and per function (innermost frame), from py-spy's raw output."""
    self_counts: collections.Counter[str] = collections.Counter()
    by_thread: collections.Counter[str] = collections.Counter()
    waiting = busy = 0
    with open(raw_file) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            who, frames = _who(stack.split(";"), default)
            c = int(count)
            if not frames or frames[-1].startswith(_WAITING):
                waiting += c
                continue
            busy += c
            by_thread[who] += c
            self_counts[f"[{who.split()[0]}] {frames[-1]}"] += c
    if not busy:
        return "no busy samples\n"
    lines = [f"{busy} busy samples ({waiting} more were waiting in poll/read and are left out); by thread:\n", "```"]
    lines += [f"{c / busy:6.1%}  {name}" for name, c in by_thread.most_common(12)]
    lines += ["```", "", f"Top {n} functions by busy self samples:\n", "```"]
    lines += [f"{c / busy:6.1%}  {name}" for name, c in self_counts.most_common(n)]
    lines.append("```")
    return "\n".join(lines) + "\n"


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_PAYLOADS: list[bytes] = []


def prepare_c(jobs: int) -> None:
    """Make C's payloads before anything is measured (os.urandom costs ~2 ms per MB)."""
    while len(_PAYLOADS) < jobs:
        _PAYLOADS.append(os.urandom(1 << 20))


def run_c(cluster, jobs: int) -> float:  # type: ignore[no-untyped-def]
    prepare_c(jobs)
    payloads = _PAYLOADS[:jobs]
    start = time.perf_counter()
    handles = [cluster.submit(p) for p in payloads]
    assert [h() for h in handles] == payloads
    return jobs / (time.perf_counter() - start)


WORKLOADS = {  # name: (function, warm-up argument, runner)
    "A": (benchjobs.inc, 0, run_a),
    "C": (benchjobs.echo, b"x", run_c),
}


def cpu_per_job(address: str, node_pid: int, jobs: int, workload: str = "A") -> str:
    """Run a workload unprofiled; report CPU microseconds per job spent by each process."""
    from clusterpy.client import JobCluster

    fn, warm, runner = WORKLOADS[workload]
    cluster = JobCluster(fn, nodes=[address], secret=SECRET)
    try:
        for _ in range(50):
            cluster.submit(warm)()
        prepare_c(jobs if workload == "C" else 0)
        pids = {"client (user + loop threads)": os.getpid(), "node": node_pid}
        pids.update({f"worker {i}": pid for i, pid in enumerate(_children(node_pid))})
        before = {name: _cpu_seconds(pid) for name, pid in pids.items()}
        rate = runner(cluster, jobs)
        after = {name: _cpu_seconds(pid) for name, pid in pids.items()}
    finally:
        cluster.close()
    lines = [f"## CPU time per job, {workload} unprofiled ({rate:,.0f} jobs/s = {1e6 / rate:,.0f} us of wall time per job)\n",
             "| process | CPU us per job |", "|---|---:|"]
    total = 0.0
    for name in pids:
        us = (after[name] - before[name]) / jobs * 1e6
        total += us
        lines.append(f"| {name} | {us:,.0f} |")
    lines.append(f"| all | {total:,.0f} (2 CPUs give {2e6 / total:,.0f} jobs/s at most) |")
    return "\n".join(lines) + "\n"


def syscalls_per_job(address: str, node_pid: int, jobs: int, out: str, workload: str = "A") -> str:
    """Run a workload under ``strace -c`` (client, node, workers): system calls per job by name."""
    strace = shutil.which("strace")
    if strace is None:
        return "strace is not installed: no system call counts.\n"
    from clusterpy.client import JobCluster

    fn, warm, runner = WORKLOADS[workload]
    cluster = JobCluster(fn, nodes=[address], secret=SECRET)
    tracers = []
    try:
        for _ in range(50):
            cluster.submit(warm)()
        prepare_c(jobs if workload == "C" else 0)
        # The client's tracer last: with -f it would also trace the tracers started after it.
        targets = {"node": [node_pid], "workers": _children(node_pid), "client": [os.getpid()]}
        for who, pids in targets.items():
            args = [strace, "-c", "-f", "-o", os.path.join(out, f"strace-{workload}-{who}.txt")]
            for pid in pids:
                args += ["-p", str(pid)]
            tracers.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1.0)  # strace attaches
        runner(cluster, jobs)
    finally:
        for tracer in tracers:
            tracer.send_signal(signal.SIGINT)
        for tracer in tracers:
            tracer.wait(30)
        cluster.close()
    lines = [f"## System calls per job, {workload} under strace (top 8 per process group)\n",
             "| who | calls per job | busiest calls (per job) |", "|---|---:|---|"]
    for who in ("client", "node", "workers"):
        path = os.path.join(out, f"strace-{workload}-{who}.txt")
        counts: dict[str, int] = {}
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        counts[parts[-1]] = int(parts[3])
        except OSError:
            continue
        total = sum(counts.values())
        busiest = ", ".join(f"{name} {n / jobs:.1f}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])[:8])
        lines.append(f"| {who} | {total / jobs:.1f} | {busiest} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "clusterpy-profile"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.environ["CLUSTERPY_SECRET"] = SECRET
    report = []

    # 0: CPU time and system calls per job, no profiler in the way.
    node, address = start_node(args.out, profiled=False)
    try:
        report.append(cpu_per_job(address, node.pid, args.jobs))
        report.append(syscalls_per_job(address, node.pid, args.jobs, args.out))
        report.append(cpu_per_job(address, node.pid, 50, "C"))
        report.append(syscalls_per_job(address, node.pid, 50, args.out, "C"))
    finally:
        _stop_process(node)
    print("\n".join(report), flush=True)

    # 1 + 2: deterministic profiles of client and node.
    node, address = start_node(args.out, profiled=True)
    try:
        rate, hops = profile_client(address, args.out, args.jobs, args.calls)
    finally:
        node.send_signal(signal.SIGTERM)  # the node exits normally, so cProfile writes its file
        node.wait(30)
    report.append(f"## Under cProfile: A {rate:,.0f} jobs/s (profiling slows it down)\n")
    report.append("### B: median time per hop of a round trip (ms)\n")
    report += [f"- {k}: {v:.3f}" for k, v in hops.items()]
    report.append("")
    for name in ("A", "B"):
        report.append(top(os.path.join(args.out, f"client-{name}-user-thread.prof"), args.top, f"{name}: client, user thread"))
        report.append(top(os.path.join(args.out, f"client-{name}-loop-thread.prof"), args.top, f"{name}: client, event-loop thread"))
    report.append(top(os.path.join(args.out, "node.prof"), args.top, "A+B: node process, main thread"))

    # 3: sampling, unprofiled processes.
    pyspy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.exists(pyspy):
        from clusterpy.client import JobCluster

        node, address = start_node(args.out, profiled=False)
        spies = []
        try:
            cluster = JobCluster(benchjobs.inc, nodes=[address], secret=SECRET)
            for i in range(200):
                cluster.submit(i)()
            for who, pid, extra in (("node", node.pid, ["--subprocesses"]), ("client", os.getpid(), [])):
                spies.append(subprocess.Popen(
                    [pyspy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--threads",
                     *extra, "-o", os.path.join(args.out, f"pyspy-{who}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)  # py-spy attaches
            rate = run_a(cluster, args.jobs)
            cluster.close()
        finally:
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            for spy in spies:
                spy.wait(30)
            _stop_process(node)
        report.append(f"## Sampled with py-spy (not slowed): A {rate:,.0f} jobs/s\n")
        for who in ("client", "node"):
            path = os.path.join(args.out, f"pyspy-{who}.txt")
            if os.path.exists(path):
                report.append(f"## py-spy, {who} process{' and its workers' if who == 'node' else ''}\n")
                report.append(pyspy_summary(path, args.top, who))
    else:
        report.append("py-spy is not installed: no sampled profile.\n")
    text = "\n".join(report)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
