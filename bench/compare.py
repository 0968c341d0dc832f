#!/usr/bin/env python3
"""clusterpy side by side with dispy, dask.distributed, ProcessPoolExecutor and loky.

Usage (in the environment described in bench/README.md; this script installs nothing)::

    python bench/compare.py                 # everything, 5 repetitions (about 10 minutes)
    python bench/compare.py --quick         # smaller sizes, fewer repetitions (2-3 minutes)
    python bench/compare.py -w AB -f clusterpy,ppe --reps 3 --json out.json

Workloads (every framework gets 2 worker CPUs on 127.0.0.1):

    A  5,000 trivial jobs (x + 1), submitted one by one; and through map (chunked if it can)
    B  round trip of one trivial job, 200 in sequence (median and p99)
    C  50 jobs each sending 1 MB and returning 1 MB (MB/s, both directions counted)
    D  cold start: process start to first result with the framework's embedded/local node
    E  8 jobs of 0.5 s pure-Python work on 2 CPUs (ideal 2.0 s)
    F  clusterpy's sans-IO scheduling core alone, 10..10,000 simulated nodes, 1,000,000 jobs
    G  raw asyncio loopback round trips of framed messages (the practical limit), and the
       same over clusterpy's authenticated transport (as many repetitions, medians kept)

Repetitions are interleaved (each repetition runs every framework in turn, in a rotating
order) so a machine that slows down mid-run hurts all frameworks alike; each cell is the
median over repetitions and its ratio is the median of the per-repetition ratios. Each
framework's repetition runs in a new process (bench/runner.py) with only its own backend
alive, so no framework shares threads, a GIL or idle daemons with another.

dispy finds its peers by UDP broadcast. So that nothing is ever broadcast on this machine's
real interfaces, the script re-runs itself inside a new network namespace holding only
loopback (``unshare --net``, needs root); without one, dispy is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import frameworks as fw  # noqa: E402
import rawloop  # noqa: E402
import simcore  # noqa: E402
import workloads as wl  # noqa: E402

ORDER = ["clusterpy", "dispy", "dask", "ppe", "loky"]
#: Seconds one framework's repetition of A, B, C and E may take (dispy's A takes ~40 s).
CHILD_TIMEOUT = 900
#: Metrics whose ratio means nothing (a percentage that may be negative, a calibration).
NO_RATIO = {"E.over", "E.single"}


# ------------------------------------------------------------------------- environment


def enter_private_network(argv: list[str]) -> None:
    """Re-exec inside a new network namespace (only loopback) unless already in one."""
    if fw.isolated_network():
        _loopback_up()
        return
    if os.environ.get("CLUSTERPY_BENCH_NETNS"):
        raise SystemExit("inside the new network namespace there are interfaces other than loopback")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        print("note: not root or no unshare(1): running on the host network; dispy will be skipped",
              file=sys.stderr)
        return
    os.environ["CLUSTERPY_BENCH_NETNS"] = "1"  # a second exec would mean unshare did not isolate us
    os.execvp("unshare", ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *argv])


def _loopback_up() -> None:
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, request))[1]
        if not flags & iff_up:
            fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("clusterpy", "cloudpickle", "dispy", "pycos", "distributed", "dask", "loky"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.system()} {platform.release()}, {model}, {os.cpu_count()} CPUs, {mem:.0f} GiB"


def _spin_twice(iterations: int) -> None:
    import benchjobs

    benchjobs.spin(iterations)
    benchjobs.spin(iterations)


def parallel_scaling(cpus: int) -> float:
    """How much longer ``cpus`` busy processes take than one (1.0: the CPUs are all there).

    Each process runs the same pure-Python work; the best of 2 tries counts. On a shared
    virtual machine this is often well above 1.0, and no framework can beat it (workload E).
    """
    import multiprocessing

    iterations = wl.calibrate_spin(0.25)
    ctx = multiprocessing.get_context("fork")

    def run(n: int) -> float:
        start = time.perf_counter()
        procs = [ctx.Process(target=_spin_twice, args=(iterations,)) for _ in range(n)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        return time.perf_counter() - start

    one = min(run(1) for _ in range(2))
    many = min(run(cpus) for _ in range(2))
    return many / one


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ runs

Results = dict[str, dict[str, list[float]]]  # metric -> framework -> values per repetition
NOTES: list[str] = []  # what went wrong during the run, printed under the table


def _record(results: Results, name: str, values: dict[str, float]) -> None:
    for key, value in values.items():
        results.setdefault(key, {}).setdefault(name, []).append(value)


def run_cold_start(names: list[str], reps: int, cpus: int, results: Results) -> None:
    env = {**os.environ, "CLUSTERPY_SECRET": fw.SECRET, "PYTHONPATH": HERE}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            start = time.time()
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "coldstart.py"), name, str(cpus)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=HERE)
            out, err = proc.communicate(timeout=120)
            total = time.time() - start
            line = next((l for l in out.decode().splitlines() if l.startswith("first-result ")), None)
            if proc.returncode != 0 or line is None:
                log(f"D {name}: failed (exit {proc.returncode}): {err.decode()[-500:]}")
                continue
            _record(results, name, {"D.first": float(line.split()[1]) - start, "D.total": total})
            log(f"D {name} rep {rep + 1}: first result {float(line.split()[1]) - start:.2f} s")


def run_workloads(letters: str, names: list[str], p: wl.Params, reps: int, results: Results) -> None:
    """Each repetition runs every framework in turn (rotating the order), each in a new process."""
    iterations = wl.calibrate_spin(p.e_seconds) if "E" in letters else 0
    params = json.dumps(p.__dict__)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            proc = subprocess.Popen(
                [sys.executable, os.path.join(HERE, "runner.py"), name, letters, params, str(iterations)],
                stdout=subprocess.PIPE, start_new_session=True,  # its own group: killable as a whole
            )
            try:
                out, _ = proc.communicate(timeout=CHILD_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                NOTES.append(f"{name}: repetition {rep + 1} did not finish within {CHILD_TIMEOUT} s and was killed")
                log(NOTES[-1])
                continue
            line = next((l for l in out.decode().splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                NOTES.append(f"{name}: repetition {rep + 1} failed (exit {proc.returncode})")
                log(NOTES[-1])
                continue
            result = json.loads(line[len("RESULT "):])
            if "unavailable" in result:
                NOTES.append(f"{name}: unavailable: {result['unavailable']}")
                log(NOTES[-1])
                names.remove(name)
                continue
            for note in result.get("notes", []):
                NOTES.append(f"repetition {rep + 1}: {note}")
                log(NOTES[-1])
            _record(results, name, result["values"])
            log(f"{name} rep {rep + 1}: " + ", ".join(f"{k}={v:,.3f}" for k, v in result["values"].items()))


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(15)
            return
        except subprocess.TimeoutExpired:
            continue


# ----------------------------------------------------------------------------- report


def advantage(metric: wl.Metric, results: Results, name: str) -> float | None:
    """Median over repetitions of how many times clusterpy is better than ``name`` (>1: better)."""
    ours, theirs = results.get(metric.key, {}).get("clusterpy"), results.get(metric.key, {}).get(name)
    if not ours or not theirs:
        return None
    pairs = list(zip(ours, theirs))
    if metric.higher_is_better:
        ratios = [a / b for a, b in pairs if b > 0]
    else:
        ratios = [b / a for a, b in pairs if a > 0]
    return statistics.median(ratios) if ratios else None


def table(metrics: list[wl.Metric], names: list[str], results: Results) -> str:
    head = "| metric | unit | " + " | ".join(names) + " |"
    lines = [head, "|---|---|" + "---:|" * len(names)]
    for metric in metrics:
        if metric.key not in results:
            continue
        cells = []
        for name in names:
            values = results[metric.key].get(name)
            if not values:
                cells.append("n/a")
                continue
            cell = metric.fmt.format(statistics.median(values))
            ratio = advantage(metric, results, name) if name != "clusterpy" and metric.key not in NO_RATIO else None
            if ratio is not None:
                cell += f" ({ratio:.2f}x)"
            cells.append(cell)
        lines.append(f"| {metric.label} | {metric.unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_of(results: Results, key: str, name: str) -> float | None:
    values = results.get(key, {}).get(name)
    return statistics.median(values) if values else None


def targets(results: Results, extra: dict[str, Any]) -> list[str]:
    """The issue's targets, each with the measured figure and met / MISSED / not measured."""
    out = []
    metric = {m.key: m for w in wl.WORKLOADS.values() for m in w.metrics}

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "MISSED")

    for name, goal in (("dispy", 10.0), ("dask", 2.0), ("ppe", 1.0)):
        r = advantage(metric["A.submit"], results, name)
        out.append(f"A one by one >= {goal:g}x {name}: {'-' if r is None else f'{r:.2f}x'} -> {verdict(None if r is None else r >= goal)}")
    amap, graw = median_of(results, "A.map", "clusterpy"), extra.get("G.raw.msgs")
    out.append("A map >= 50% of raw loopback msgs/s: "
               + ("- -> not measured" if amap is None or not graw else f"{amap / graw:.0%} -> {verdict(amap >= graw / 2)}"))
    b, bp = median_of(results, "B.median", "clusterpy"), median_of(results, "B.median", "ppe")
    out.append(f"B median < 1 ms: {'-' if b is None else f'{b:.3f} ms'} -> {verdict(None if b is None else b < 1.0)}")
    out.append(f"B median < 2x ppe: {'-' if b is None or bp is None else f'{b / bp:.2f}x ppe'} -> "
               f"{verdict(None if b is None or bp is None else b < 2 * bp)}")
    c, gbw = median_of(results, "C.mbps", "clusterpy"), extra.get("G.raw.mbps")
    out.append(f"C >= 50% of raw loopback MB/s: {'-' if c is None or not gbw else f'{c / gbw:.0%}'} -> "
               f"{verdict(None if c is None or not gbw else c >= gbw / 2)}")
    d = median_of(results, "D.first", "clusterpy")
    out.append(f"D first result < 1.5 s: {'-' if d is None else f'{d:.2f} s'} -> {verdict(None if d is None else d < 1.5)}")
    e, ep = median_of(results, "E.over", "clusterpy"), median_of(results, "E.over", "ppe")
    scaling = extra.get("scaling")
    out.append(f"E within 10% of ideal: {'-' if e is None else f'{e:+.1f}%'} -> {verdict(None if e is None else e <= 10)}"
               + ("" if ep is None else f" (ppe {ep:+.1f}%)")
               + ("" if scaling is None else f"; bare processes on this machine: {(scaling - 1) * 100:+.0f}%"))
    f = extra.get("F")
    if f:
        sim = next((s for s in f["sims"] if s["nodes"] == 1000), None)
        if sim:
            rate = sim["drain_per_s"]
            first, last = sim["samples"][0][1], sim["samples"][-1][1]
            out.append(f"F >= 100k jobs/s with 1,000 nodes: {rate:,.0f} dispatch decisions/s while draining -> "
                       f"{verdict(rate >= 100_000)}; cost per job {first:.2f} us at the deepest queue, "
                       f"{last:.2f} us at the end")
    return out


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-w", "--workloads", default="ABCDEFG", help="letters of the workloads to run (default ABCDEFG)")
    p.add_argument("-f", "--frameworks", default=",".join(ORDER), help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--quick", action="store_true", help="smaller workloads and 3 repetitions")
    p.add_argument("--reps", type=int, default=None, help="repetitions per workload (default 5, --quick 3)")
    p.add_argument("--cpus", type=int, default=2, help="worker CPUs per framework (default 2)")
    p.add_argument("--json", metavar="PATH", help="also write every measured value to PATH")
    p.add_argument("--host-network", action="store_true",
                   help="do not enter a private network namespace (dispy is then skipped)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # A SIGTERM (timeout(1), a CI limit) unwinds like Ctrl-C, so every backend is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not args.host_network:
        enter_private_network(argv)
    letters = "".join(c for c in args.workloads.upper() if c in "ABCDEFG")
    reps = args.reps or (3 if args.quick else 5)
    p = wl.Params(a_jobs=1000, a_map_items=50_000, b_calls=100, c_jobs=20, cpus=args.cpus) if args.quick else wl.Params(cpus=args.cpus)
    wanted = [n.strip() for n in args.frameworks.split(",") if n.strip()]
    unknown = set(wanted) - set(fw.FRAMEWORKS)
    if unknown:
        raise SystemExit(f"unknown frameworks: {', '.join(sorted(unknown))}")
    if "clusterpy" not in wanted:
        wanted.insert(0, "clusterpy")  # every ratio is to clusterpy
    checks = {name: fw.quick_check(name) for name in ORDER if name in wanted}
    skipped = {name: why for name, why in checks.items() if why}
    for name, why in skipped.items():
        log(f"skipping {name}: {why}")
    names = [name for name in checks if name not in skipped]
    os.environ["CLUSTERPY_SECRET"] = fw.SECRET

    started = datetime.datetime.now().astimezone()
    load = os.getloadavg()
    results: Results = {}
    extra: dict[str, Any] = {}
    if "D" in letters:
        log("D: cold starts")
        run_cold_start(names, reps, args.cpus, results)
    if "G" in letters:
        log("G: raw loopback")
        small = 20_000 if args.quick else 100_000
        # As many repetitions as the workloads get, the medians kept: one G alone swings
        # 1.1-2.3 GB/s (1 MB echo) between runs on a shared 2-CPU machine.
        samples: dict[str, list[float]] = {}
        for rep in range(reps):
            for mode in ("raw", "clusterpy"):
                measured = rawloop.measure(mode, small=small)
                for key, value in measured.items():
                    samples.setdefault(key, []).append(value)
                log(f"G {mode} rep {rep + 1}: " + ", ".join(f"{k}={v:,.1f}" for k, v in measured.items()))
        extra.update({key: statistics.median(values) for key, values in samples.items()})
    if "F" in letters:
        log("F: scheduling core simulation")
        extra["F"] = simcore.run(args.quick)
    if "E" in letters:
        extra["scaling"] = parallel_scaling(args.cpus)
        log(f"{args.cpus} busy processes take {extra['scaling']:.2f}x as long as one")
    if set(letters) & set("ABCE"):
        run_workloads("".join(c for c in letters if c in "ABCE"), names, p, reps, results)

    metrics = sorted([*(m for w in wl.WORKLOADS.values() for m in w.metrics), *wl.COLD_START],
                     key=lambda m: m.key[0])  # stable: A, B, C, D, E in declaration order
    print(f"# clusterpy benchmark, {started:%Y-%m-%d %H:%M %Z}\n")
    print(f"Machine: {machine()}  ")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + "  ")
    print(f"Sizes: A {p.a_jobs} jobs (map: {p.a_map_items} items, chunksize {p.chunksize}), B {p.b_calls} calls, C {p.c_jobs} x "
          f"{p.c_bytes >> 20} MB, E {p.e_jobs} x {p.e_seconds} s; {args.cpus} worker CPUs each; "
          f"{reps} repetitions; network: {'private namespace (loopback only)' if fw.isolated_network() else 'host loopback'}")
    print(f"Load average at the start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; at the end: "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()) + "  ")
    if "scaling" in extra:
        print(f"Parallel scaling of this machine: {args.cpus} busy processes (no framework) take "
              f"{extra['scaling']:.2f}x as long as one (1.00 = {args.cpus} full CPUs)  ")
    for name, why in skipped.items():
        print(f"Skipped {name}: {why}  ")
    print("\nMedians; in parentheses how many times clusterpy is better than that framework (>1: clusterpy wins).\n")
    print(table(metrics, names, results))
    for key in ("A.errors", "B.errors", "C.errors", "E.errors"):
        if results.get(key):
            print(f"\nJobs that {', '.join(results[key])} lost or failed in {key[0]} (per repetition where any): "
                  + ", ".join(f"{k}: {[int(x) for x in v]}" for k, v in results[key].items()))
    for note in NOTES:
        print(f"\nNote: {note}")
    if any(k.startswith("G.") for k in extra):
        print("\n## G. Loopback limit (one echo server process)\n")
        print("| transport | pipelined small msgs/s | sequential RTT median (p99) us | 1 MB echo MB/s (both ways) |")
        print("|---|---:|---:|---:|")
        for mode, label in (("raw", "plain asyncio streams"), ("clusterpy", "clusterpy authenticated transport")):
            if f"G.{mode}.msgs" in extra:
                print(f"| {label} | {extra[f'G.{mode}.msgs']:,.0f} | {extra[f'G.{mode}.rtt']:.0f} "
                      f"({extra[f'G.{mode}.rtt99']:.0f}) | {extra[f'G.{mode}.mbps']:,.0f} |")
    if "F" in extra:
        print("\n## F. Scheduling core alone (simulated nodes, 2 CPUs each, prefetch 1)\n")
        print(simcore.format_report(extra["F"]))
    print("\n## Targets\n")
    for line in targets(results, extra):
        print(f"- {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started.isoformat(), "machine": machine(), "versions": versions(),
                       "params": p.__dict__, "reps": reps, "skipped": skipped, "results": results,
                       "extra": extra}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
