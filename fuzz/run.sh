#!/usr/bin/env bash
# Run every fuzz target (or those named) for SECONDS seconds each.
#
#   fuzz/run.sh 60                     # what CI runs: every target, 60 s each
#   fuzz/run.sh 300 control registry   # only these
#   PYTHON=/path/to/venv/bin/python fuzz/run.sh 300
#
# Targets: mux (fuzz_mux.py, the yamux engines, differential), control
# (fuzz_control.py, the control protocol's parsers), registry
# (fuzz_registry.py, the registry service and its client), proxy
# (fuzz_proxy.py, the PROXY v1 header writer).
#
# Needs fastnat installed with its compiled extension, and atheris
# (pip install atheris). New corpus entries and any crashing input go into a
# fresh temporary directory (printed at the end), one subdirectory per target;
# the committed seeds in fuzz/corpus/<target> are read, never written. Every
# target runs even when an earlier one failed. Exit status: 0 when every run
# ended clean, non-zero on any crash, timeout (hang), memory blow-up, or if a
# target could not run at all.
set -uo pipefail

seconds="${1:?usage: fuzz/run.sh SECONDS [TARGET...]}"
case "$seconds" in (*[!0-9]*|'') echo "fuzz/run.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2;; esac
shift
all_targets=(mux control registry proxy)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
for target in "${targets[@]}"; do
    case " ${all_targets[*]} " in (*" $target "*) ;; (*) echo "fuzz/run.sh: unknown target '$target' (known: ${all_targets[*]})" >&2; exit 2;; esac
done
python="${PYTHON:-python3}"
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastnat-fuzz.XXXXXX")"

# Per target: the dictionary and the largest input. -max_len: mux inputs up
# to 8 KiB (its script can synthesize Data frames of up to 512 KiB, so that is
# enough to fill windows); control and registry: 8 KiB of wire (the message
# cap is reached with the small caps the input can choose); proxy: two
# addresses.
declare -A dict=([mux]="$here/mux.dict" [control]="$here/control.dict" [registry]="$here/control.dict" [proxy]="")
declare -A max_len=([mux]=8192 [control]=8192 [registry]=8192 [proxy]=1024)

echo "fuzz/run.sh: ${targets[*]}, $seconds s each, with $("$python" -c 'import sys; print(sys.executable)'); output in $work"
failed=()
for target in "${targets[@]}"; do
    out="$work/$target"
    mkdir -p "$out/corpus" "$out/crashes"
    echo "=== fuzz/run.sh: $target ($seconds s)"
    # -timeout: one input taking longer than this is a hang. -rss_limit_mb:
    # nothing may grow memory without bound.
    "$python" "$here/fuzz_$target.py" "$out/corpus" "$here/corpus/$target" \
        ${dict[$target]:+-dict="${dict[$target]}"} \
        -max_total_time="$seconds" \
        -timeout=25 \
        -rss_limit_mb=2048 \
        -max_len="${max_len[$target]}" \
        -print_final_stats=1 \
        -artifact_prefix="$out/crashes/" \
        2>&1 | tee "$out/fuzz.log"
    status=${PIPESTATUS[0]}
    crashes=$(find "$out/crashes" -type f | wc -l)
    if [ "$status" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        echo "fuzz/run.sh: $target FAILED (exit status $status, $crashes crashing input(s)):" >&2
        find "$out/crashes" -type f -printf '  %p (%s bytes)\n' >&2
        echo "replay one with: $python $here/fuzz_$target.py <file>" >&2
        failed+=("$target")
    else
        grep -E '^(#[0-9]+[[:space:]]+DONE|Done [0-9]+ runs)' "$out/fuzz.log" | tail -2
        echo "fuzz/run.sh: $target clean ($seconds s); new corpus entries in $out/corpus"
    fi
done

if [ ${#failed[@]} -ne 0 ]; then
    echo "fuzz/run.sh: FAILED: ${failed[*]} (output in $work)" >&2
    exit 1
fi
echo "fuzz/run.sh: clean (${targets[*]}, $seconds s each)"
