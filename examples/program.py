"""Run a standalone program on the cluster with arguments and a data file.

The program (examples/count_words.sh) and the data file are shipped to the nodes; each job
runs the program with its own arguments in the computation's directory. A job's result is the
program's exit code; its output is in job.stdout.
"""

import os
import sys

import clusterpy

HERE = os.path.dirname(os.path.abspath(__file__))


def main(nodes):
    program = os.path.join(HERE, "count_words.sh")
    data = os.path.join(HERE, "data", "words.txt")
    words = ["alpha", "eta", "zeta", "ps"]
    failed = 0
    with clusterpy.JobCluster(program, nodes=nodes or None, depends=[data]) as cluster:
        jobs = [cluster.submit(word, "words.txt") for word in words]
        for job in jobs:
            exit_code = job()
            print(f"{' '.join(job.args)!s:<16} exit={exit_code} output={job.stdout.strip()!r}")
            failed += exit_code != 0
    print(f"{len(words) - failed} of {len(words)} words found")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
