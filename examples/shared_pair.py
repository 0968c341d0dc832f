"""Two programs share one clusterpy-scheduler at the same time.

    clusterpy-node --port 9700 &
    clusterpy-scheduler --nodes 127.0.0.1:9700 &
    python examples/shared_pair.py [SCHEDULER_HOST:PORT]

It starts two copies of examples/shared_cluster.py against the same scheduler and waits for
both; each gets its own results.
"""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(scheduler):
    program = os.path.join(HERE, "shared_cluster.py")
    procs = [subprocess.Popen([sys.executable, program, scheduler], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate()[0] for p in procs]
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        done = out.count("computed by worker")
        print(f"program {i}: exit {proc.returncode}, {done} jobs")
    return max(p.returncode for p in procs)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9702"))
