"""One repetition of workloads A, B, C, E for one framework, in a process of its own.

``python bench/runner.py FRAMEWORK LETTERS PARAMS_JSON SPIN_ITERATIONS`` starts the framework's
backend, runs each workload once (after a warm-up), stops the backend and prints one line
``RESULT {json}`` with ``{"values": {metric: value}, "notes": [...]}`` (or ``"unavailable"``).

compare.py runs a new process per framework and repetition so that no framework shares a
process, threads or idle backends with another one: dask's client event loop or dispy's
pycos threads in the same process slowed every other framework measured beside them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchjobs  # noqa: E402
import frameworks as fw  # noqa: E402
import workloads as wl  # noqa: E402

#: Trivial jobs run before A is timed: connections, worker start-up, caches.
A_WARMUP = 200


def run(name: str, letters: str, p: wl.Params, iterations: int) -> dict[str, Any]:
    framework = fw.FRAMEWORKS[name](p.cpus)
    if framework.unavailable:
        return {"unavailable": framework.unavailable}
    values: dict[str, float] = {}
    notes: list[str] = []
    framework.launch()
    try:
        for letter in letters:
            workload = wl.WORKLOADS[letter]
            session = framework.open(workload.fn)
            try:
                session.call(*workload.warmup_args)
                if letter == "A":
                    session.gather([session.submit(i) for i in range(A_WARMUP)])
                    values.update(wl.run_a(session, p, framework.cpu_seconds))
                elif letter == "B":
                    values.update(wl.run_b(session, p))
                elif letter == "C":
                    values.update(wl.run_c(session, p, wl.make_payloads(p)))
                    session.close()
                    session = framework.open(benchjobs.echo_array)
                    values.update(wl.run_c_numpy(session, p))
                else:
                    values.update(wl.run_e(session, p, iterations))
            except fw.Stalled as exc:
                notes.append(f"{letter}: {name} stalled ({exc}); no figure; its backend was restarted")
                restart = True
            else:
                restart = getattr(session, "stalled", False)
                if restart:
                    notes.append(f"{letter}: {name} stopped answering with {session.errors} jobs out; the "
                                 "figure counts the jobs that ended, up to the last one; its node was restarted")
            finally:
                session.close()
            if restart:  # (dispy) its node runs nothing more: the next workload gets a new one
                framework.stop()
                framework.launch()
    finally:
        framework.stop()
    return {"values": values, "notes": notes}


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the backend
    name, letters, params, iterations = argv
    result = run(name, letters, wl.Params(**json.loads(params)), int(iterations))
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
