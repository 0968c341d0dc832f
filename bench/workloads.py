"""Workloads A, B, C and E: the same code run against every framework's :class:`Session`.

Each ``run_*`` function takes an open session (already warmed up by one job) and returns
``{metric key: value}`` for one repetition. Results are checked, so a framework that drops or
corrupts jobs cannot look fast.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import benchjobs
from frameworks import NotSupported, Session, Stalled


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    fmt: str = "{:,.0f}"


@dataclass(frozen=True)
class Params:
    """Sizes of the workloads (``--quick`` makes them smaller)."""

    a_jobs: int = 5000
    a_map_items: int = 200_000
    b_calls: int = 200
    c_jobs: int = 50
    c_bytes: int = 1 << 20
    e_jobs: int = 8
    e_seconds: float = 0.5
    cpus: int = 2

    @property
    def chunksize(self) -> int:
        # As many chunks as 8 per worker: large enough to amortise, small enough to balance.
        return max(1, self.a_map_items // (self.cpus * 8))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on the sorted values."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _check(results: list[Any], expected: list[Any], session: Session, what: str) -> None:
    bad = sum(1 for got, want in zip(results, expected) if got != want) + abs(len(results) - len(expected))
    if bad > session.errors:
        raise AssertionError(f"{what}: {bad} of {len(expected)} results are wrong")


def run_a(session: Session, p: Params, cpu: Callable[[], float]) -> dict[str, float]:
    """A: ``a_jobs`` trivial jobs submitted one by one, then ``a_map_items`` through map (in
    chunks) if the framework has one.

    ``cpu()`` returns the CPU seconds used so far by every process of the framework: CPU per
    job is the figure a busy shared machine disturbs least.
    """
    n = p.a_jobs
    session.reset()
    cpu_start = cpu()
    start = time.perf_counter()
    handles = [session.submit(i) for i in range(n)]
    results = session.gather(handles)
    elapsed = session.finished_at(time.perf_counter()) - start
    cpu_used = cpu() - cpu_start
    _check(results, [i + 1 for i in range(n)], session, "A")
    done = n - session.errors  # jobs lost by the framework do not count as work done
    if done <= 0:
        raise Stalled("A: no job ended")
    out = {"A.submit": done / elapsed, "A.cpu": cpu_used / done * 1e6}
    items = p.a_map_items
    try:
        start = time.perf_counter()
        results = session.map(range(items), p.chunksize)
        elapsed = time.perf_counter() - start
    except NotSupported:
        pass
    else:
        _check(results, [i + 1 for i in range(items)], session, "A map")
        out["A.map"] = items / elapsed
    if session.errors:
        out["A.errors"] = session.errors
    return out


def run_b(session: Session, p: Params) -> dict[str, float]:
    """B: round trip of one trivial job, ``b_calls`` times in sequence."""
    for i in range(5):  # warm caches and connections
        session.call(i)
    lat = []
    session.reset()
    for i in range(p.b_calls):
        errors = session.errors
        start = time.perf_counter()
        value = session.call(i)
        elapsed = time.perf_counter() - start
        if session.errors > errors:
            continue  # lost by the framework (counted), not a round trip
        if value != i + 1:
            raise AssertionError(f"B: job {i} returned {value!r}")
        lat.append(elapsed)
    if not lat:
        raise Stalled(f"B: all {p.b_calls} round trips were lost")
    out = {"B.median": percentile(lat, 50) * 1e3, "B.p99": percentile(lat, 99) * 1e3}
    if session.errors:
        out["B.errors"] = session.errors
    return out


def make_payloads(p: Params) -> list[bytes]:
    return [os.urandom(p.c_bytes) for _ in range(p.c_jobs)]


def run_c(session: Session, p: Params, payloads: list[bytes]) -> dict[str, float]:
    """C: ``c_jobs`` jobs each sending ``c_bytes`` and returning as many (MB/s both ways)."""
    session.reset()
    start = time.perf_counter()
    handles = [session.submit(data) for data in payloads]
    results = session.gather(handles)
    elapsed = session.finished_at(time.perf_counter()) - start
    _check(results, payloads, session, "C")
    done = len(payloads) - session.errors
    out = {"C.mbps": 2 * done * p.c_bytes / elapsed / 1e6}
    if session.errors:
        out["C.errors"] = session.errors
    return out


def run_c_numpy(session: Session, p: Params) -> dict[str, float]:
    """C with NumPy arrays of ``c_bytes`` each (float64) instead of ``bytes``: where pickle-5
    out-of-band buffers matter. Nothing if NumPy is not installed."""
    try:
        import numpy as np
    except ImportError:
        return {}
    rng = np.random.default_rng(7)
    arrays = [rng.random(p.c_bytes // 8) for _ in range(p.c_jobs)]
    # Every worker imports NumPy before the clock starts (a first unpickle does).
    session.gather([session.submit(array[:1000]) for array in arrays[: 4 * p.cpus]])
    session.reset()
    start = time.perf_counter()
    handles = [session.submit(array) for array in arrays]
    results = session.gather(handles)
    elapsed = session.finished_at(time.perf_counter()) - start
    bad = sum(1 for got, want in zip(results, arrays) if not np.array_equal(got, want))
    if bad + abs(len(results) - len(arrays)) > session.errors:
        raise AssertionError(f"C (NumPy): {bad} of {len(arrays)} results are wrong")
    done = len(arrays) - session.errors
    return {"C.numpy": 2 * done * p.c_bytes / elapsed / 1e6}


def calibrate_spin(seconds: float) -> int:
    """Iterations of :func:`benchjobs.spin` that take ``seconds`` here (best of 3)."""
    n = 200_000
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        benchjobs.spin(n)
        best = min(best, time.perf_counter() - start)
    return max(1, int(n * seconds / best))


def run_e(session: Session, p: Params, iterations: int) -> dict[str, float]:
    """E: ``e_jobs`` CPU-bound jobs on ``cpus`` CPUs.

    ``E.seconds`` is to be compared with the nominal ideal ``e_jobs * e_seconds / cpus``
    (``iterations`` were calibrated in another process, at another moment). ``E.over``
    measures the ideal here and now: the same session first runs one job alone (twice, the
    faster counts), and the ideal is ``e_jobs * that / cpus``, so a machine that is slower
    than at calibration, or busy with other work, does not count against the framework.
    """
    session.reset()
    single = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        session.call(iterations)
        single = min(single, time.perf_counter() - start)
    start = time.perf_counter()
    handles = [session.submit(iterations) for _ in range(p.e_jobs)]
    session.gather(handles)
    elapsed = session.finished_at(time.perf_counter()) - start
    ideal = p.e_jobs * single / p.cpus
    out = {"E.seconds": elapsed, "E.over": (elapsed / ideal - 1) * 100, "E.single": single}
    if session.errors:
        out["E.errors"] = session.errors
    return out


@dataclass(frozen=True)
class Workload:
    letter: str
    fn: Callable[..., Any]
    warmup_args: tuple[Any, ...]
    metrics: tuple[Metric, ...]


WORKLOADS: dict[str, Workload] = {
    "A": Workload("A", benchjobs.inc, (0,), (
        Metric("A.submit", "A. trivial jobs, submitted one by one", "jobs/s", True),
        Metric("A.cpu", "A. CPU time per job, one by one (all processes)", "us", False),
        Metric("A.map", "A. trivial jobs, map (chunked where possible)", "jobs/s", True),
    )),
    "B": Workload("B", benchjobs.inc, (0,), (
        Metric("B.median", "B. round trip of one job, median", "ms", False, "{:.3f}"),
        Metric("B.p99", "B. round trip of one job, p99", "ms", False, "{:.3f}"),
    )),
    "C": Workload("C", benchjobs.echo, (b"x",), (
        Metric("C.mbps", "C. 1 MB in + 1 MB out per job", "MB/s", True, "{:,.1f}"),
        Metric("C.numpy", "C. the same with 1 MB NumPy arrays", "MB/s", True, "{:,.1f}"),
    )),
    "E": Workload("E", benchjobs.spin, (10,), (
        Metric("E.seconds", "E. 8 x 0.5 s CPU jobs on 2 CPUs (ideal 2.0)", "s", False, "{:.2f}"),
        Metric("E.single", "E. one such job alone, round trip", "s", False, "{:.3f}"),
        Metric("E.over", "E. time over ideal (8 x one job alone / 2)", "%", False, "{:+.1f}"),
    )),
}

COLD_START = (
    Metric("D.first", "D. cold start: process start to first result", "s", False, "{:.2f}"),
    Metric("D.total", "D. whole process (start, first result, shut down)", "s", False, "{:.2f}"),
)
