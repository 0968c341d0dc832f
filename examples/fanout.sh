#!/bin/sh
# Fan a program out over the cluster from the shell: `clusterpy` ships the program and the
# data file to the nodes and runs one job per -a (its arguments split as a shell would).
#
#   examples/fanout.sh                       # nodes found by discovery, else an embedded local node
#   examples/fanout.sh 10.0.0.5 10.0.0.6     # these nodes (clusterpy-node running there)
#
# Each job's output comes back grouped under a header. Try also, by hand:
#   clusterpy --output-dir out ...   files out/<n>.stdout, .stderr, .exit and out/jobs.jsonl
#   clusterpy --json ...             one JSON record per job, for scripts
#   clusterpy status -n NODE         what the nodes are doing
# The exit status is 0 only if every job exited 0.
set -e
cd "$(dirname "$0")"
nodes=""
for node in "$@"; do
    nodes="$nodes -n $node"
done
# shellcheck disable=SC2086 # $nodes is meant to split into options
exec clusterpy $nodes -f data/words.txt \
    -a "alpha beta" \
    -a "gamma" \
    -a "'ta' eps" \
    ./fanout_job.sh
