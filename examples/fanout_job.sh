#!/bin/sh
# One job of examples/fanout.sh: for each WORD, how many lines of the shipped words.txt
# contain it. Exits 1 if a word is missing, so the fan-out shows a failed job.
# usage: fanout_job.sh WORD...
status=0
for word in "$@"; do
    count=$(grep -c -- "$word" words.txt || true)
    echo "$word: $count"
    [ "$count" -gt 0 ] || { echo "no line has '$word'" >&2; status=1; }
done
exit $status
