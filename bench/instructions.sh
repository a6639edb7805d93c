#!/usr/bin/env bash
# Instructions per delivered message of a gateway build, counted by callgrind: a measure that,
# unlike CPU time on this shared machine, does not move with the machine's phase. User space
# only (the kernel's loopback TCP and disk work are not counted).
#
#   bench/instructions.sh <gateway binary> [scenario]     # needs valgrind
#
# Runs the scenario (default: SendBatch of 20, durable) twice through the benchmark, with 2000
# and 6000 messages, the gateway under callgrind, and prints the difference of the two totals
# divided by the difference of the messages delivered: the cost of one more message, without
# start-up and shutdown. See bench/PROFILE.md ("Sixth pass").
set -euo pipefail

gateway=$(realpath "${1:?usage: bench/instructions.sh <gateway binary> [scenario]}")
scenario=${2:-"=1k conversations, SendBatch of 20, durable"}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }

cd "$(dirname "$0")/.."
bench=$(cargo bench --bench gateway --no-run 2>&1 | grep -oE '\([^)]*/gateway-[0-9a-f]+\)' | tr -d '()' | tail -1)
[ -x "$bench" ] || { echo "could not find the benchmark binary" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() { # $1: messages; prints "<instructions> <messages delivered>"
    local out="$work/callgrind.$1"
    # The benchmark kills the process it started: valgrind runs detached from it, and is
    # stopped with SIGINT afterwards so the gateway shuts down and callgrind writes its file.
    cat >"$work/wrap" <<EOF
#!/usr/bin/env bash
valgrind --tool=callgrind --callgrind-out-file=$out "$gateway" "\$@" >"$work/gateway.log" 2>&1 &
wait
EOF
    chmod +x "$work/wrap"
    BENCH_GATEWAY_BIN="$work/wrap" "$bench" --bench --repeat 1 --messages "$1" --only "$scenario" >"$work/run.$1" 2>&1
    pkill -INT -f -- "--callgrind-out-file=$out" || true
    for _ in $(seq 120); do
        pgrep -f -- "--callgrind-out-file=$out" >/dev/null || break
        sleep 1
    done
    local total delivered
    # awk reads to the end: a reader that stopped early would fail the pipeline (pipefail).
    total=$(callgrind_annotate "$out" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
    delivered=$(grep -oE "order OK \([0-9]+ msgs" "$work/run.$1" | grep -oE "[0-9]+" | tail -1 || true)
    [ -n "$delivered" ] || { echo "the run reported no delivered messages:" >&2; tail -5 "$work/run.$1" >&2; exit 1; }
    echo "$total $delivered"
}

read -r i1 n1 < <(run 2000)
read -r i2 n2 < <(run 6000)
echo "$(basename "$gateway"): $i1 instructions for $n1 messages, $i2 for $n2:" \
    "$(( (i2 - i1) / (n2 - n1) )) instructions per delivered message"
