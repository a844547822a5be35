#!/usr/bin/env bash
# Run the differential fuzz target of the yamux engines for SECONDS seconds.
#
#   fuzz/run.sh 60                     # what CI runs
#   PYTHON=/path/to/venv/bin/python fuzz/run.sh 300
#
# Needs fastnat installed with its compiled extension, and atheris
# (pip install atheris). New corpus entries and any crashing input go into a
# fresh temporary directory (printed at the end); the committed seeds in
# fuzz/corpus/mux are read, never written. Exit status: 0 when the run ended
# clean, non-zero on any crash, timeout (hang), memory blow-up, or if the
# target could not run at all.
set -uo pipefail

seconds="${1:?usage: fuzz/run.sh SECONDS}"
case "$seconds" in (*[!0-9]*|'') echo "fuzz/run.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2;; esac
python="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastnat-fuzz.XXXXXX")"
mkdir -p "$work/corpus" "$work/crashes"

echo "fuzz/run.sh: $seconds s with $("$python" -c 'import sys; print(sys.executable)'); output in $work"
# -timeout: one input taking longer than this is a hang. -rss_limit_mb: the
# engines must not grow memory without bound. -max_len: inputs up to 8 KiB
# (the script can synthesize Data frames of up to 512 KiB, so that is enough
# to fill windows).
"$python" "$here/fuzz_mux.py" "$work/corpus" "$here/corpus/mux" \
    -dict="$here/mux.dict" \
    -max_total_time="$seconds" \
    -timeout=25 \
    -rss_limit_mb=2048 \
    -max_len=8192 \
    -print_final_stats=1 \
    -artifact_prefix="$work/crashes/" \
    2>&1 | tee "$work/fuzz.log"
status=${PIPESTATUS[0]}

crashes=$(find "$work/crashes" -type f | wc -l)
if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
    echo "fuzz/run.sh: FAILED (exit status $status, $crashes crashing input(s)):" >&2
    find "$work/crashes" -type f -printf '  %p (%s bytes)\n' >&2
    echo "replay one with: $python $here/fuzz_mux.py <file>" >&2
    exit 1
fi
grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs)' "$work/fuzz.log" | tail -2
echo "fuzz/run.sh: clean ($seconds s); new corpus entries in $work/corpus"
