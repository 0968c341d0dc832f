#!/bin/sh
# A standalone program: count the lines of a data file that contain a word.
# usage: count_words.sh WORD FILE
set -e
word="$1"
file="$2"
count=$(grep -c -- "$word" "$file" || true)
echo "$word: $count"
[ "$count" -gt 0 ]
