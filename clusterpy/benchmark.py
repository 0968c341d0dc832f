"""A node's start-up micro-benchmark: a fixed pure-Python workload, timed, turned into a score.

The workload mixes what Python jobs spend their time on (integer arithmetic, dict and list
operations, string building, calls); it is deterministic, so two machines do exactly the same
work. The score is proportional to speed, ``100 * REFERENCE_SECONDS / best round time``:
of the order of 100 on a 2020s server or laptop core; a node twice as fast scores twice as
high. The scheduler fills free slots on higher-scored nodes first and then corrects the
score by the job durations it observes (:class:`clusterpy.core.placement.SpeedModel`).

Whole run: about 50-100 ms (several short rounds, timed in thread CPU time; the fastest
counts, which filters out interruptions by other processes).
"""

from __future__ import annotations

import time

__all__ = ["run_benchmark", "workload", "REFERENCE_SECONDS"]

#: Round time (seconds) that scores 100.
REFERENCE_SECONDS = 0.012
#: Rounds timed; the fastest counts.
ROUNDS = 4


def workload(size: int = 15000) -> int:
    """One round of the benchmark's work; returns a checksum (so nothing can be skipped)."""
    table: dict[int, int] = {}
    acc = 0
    for i in range(size):
        x = (i * 2654435761) & 0xFFFFFFFF
        table[x % 1021] = table.get(x % 1021, 0) + (x >> 7)
        acc ^= x
    words = [str(i * 7919) for i in range(size // 4)]
    text = "-".join(words)
    acc += len(text) + text.count("7")
    values = sorted(table.values(), reverse=True)
    acc += sum(values[:50])
    acc += sum(_fib(12) for _ in range(size // 200))
    return acc


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def run_benchmark(rounds: int = ROUNDS, slowdown: float = 1.0) -> float:
    """Run the benchmark; return the score (higher is faster).

    ``slowdown``: a factor a node started with ``--slowdown`` applies (a testing aid), so its
    score matches how slow its jobs will be.
    """
    best = float("inf")
    check = None
    for _ in range(max(1, rounds)):
        # CPU time of this thread: time lost to other processes (a node's workers starting up
        # at the same moment) does not count against the machine's speed.
        began = time.thread_time()
        value = workload()
        elapsed = time.thread_time() - began
        if check is not None and value != check:  # pragma: no cover - the work is deterministic
            raise AssertionError("the benchmark workload is not deterministic")
        check = value
        best = min(best, elapsed)
    return round(100.0 * REFERENCE_SECONDS / max(best, 1e-9) / max(slowdown, 1e-9), 2)


if __name__ == "__main__":
    began = time.perf_counter()
    score = run_benchmark()
    print(f"score {score} in {1000 * (time.perf_counter() - began):.0f} ms")
