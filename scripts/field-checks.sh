#!/usr/bin/env bash
# Re-runs the "no dead ends" targets (issue 13) with the release binary over real loopback
# sockets, and prints one line per target with what it measured:
#
#   bash scripts/field-checks.sh
#
# 1. 32 concurrent `get`s of a 4 MiB map from 127.0.0.1 against a default `serve`: all must
#    complete with the right bytes (the server's per-address limit is 8; the rest wait in its
#    admission queue).
# 2. `get DEAD,GOOD ID` of 5 MB: the dead server is set aside (target: under 2 s).
# 3. `get DEAD1,DEAD2 ID --timeout 1`: exit 1 within 2 s, "no answer from any of the 2 servers".
#
# A "dead" server is a UDP socket that is bound but never reads (a server that is down behind a
# firewall that drops everything), so no ICMP error shortens the wait.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin udpferry
bin="$PWD/target/release/udpferry"
tmp="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }

mkdir -p "$tmp/maps"
head -c $((4 << 20)) /dev/urandom >"$tmp/maps/lan.map"
head -c 5000000 /dev/urandom >"$tmp/maps/five.map"
lan_id="$(md5sum "$tmp/maps/lan.map" | cut -d' ' -f1)"
five_id="$(md5sum "$tmp/maps/five.map" | cut -d' ' -f1)"

"$bin" serve "$tmp/maps" --listen 127.0.0.1:0 >"$tmp/serve.out" 2>"$tmp/serve.err" &
pids+=($!)
for _ in $(seq 100); do
    grep -q "listening on" "$tmp/serve.out" 2>/dev/null && break
    sleep 0.1
done
good="$(sed -n 's/^listening on //p' "$tmp/serve.out")"

dead_socket() {
    python3 -c "
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('127.0.0.1', 0))
print(s.getsockname()[1], flush=True)
time.sleep(120)
" >"$1" &
    pids+=($!)
    for _ in $(seq 50); do [[ -s "$1" ]] && break; sleep 0.1; done
    echo "127.0.0.1:$(cat "$1")"
}
dead1="$(dead_socket "$tmp/dead1")"
dead2="$(dead_socket "$tmp/dead2")"

# 1. The LAN party.
start="$(now)"
gets=()
for i in $(seq 32); do
    "$bin" get "$good" "$lan_id" --cache "$tmp/c$i" -o "$tmp/o$i" --timeout 120 \
        >/dev/null 2>"$tmp/g$i.err" &
    gets+=($!)
done
ok=0
for p in "${gets[@]}"; do wait "$p" && ok=$((ok + 1)) || true; done
secs="$(since "$start")"
right=0
for i in $(seq 32); do
    [[ -f "$tmp/o$i" ]] && [[ "$(md5sum "$tmp/o$i" | cut -d' ' -f1)" == "$lan_id" ]] && right=$((right + 1))
done
echo "32 concurrent 4 MiB gets from 127.0.0.1, default serve: $ok/32 exited 0, $right/32 with the right bytes, all done in $secs s"

# 2. A dead server listed first.
start="$(now)"
status=0
"$bin" get "$dead1,$good" "$five_id" --cache "$tmp/cd" -o "$tmp/od" 2>"$tmp/dg.err" || status=$?
secs="$(since "$start")"
echo "get DEAD,GOOD of 5 MB: exit $status in $secs s (target: under 2 s): $(tail -n1 "$tmp/dg.err")"

# 3. Only dead servers, with a timeout.
start="$(now)"
status=0
"$bin" get "$dead1,$dead2" "$five_id" --cache "$tmp/cdd" --timeout 1 2>"$tmp/dd.err" || status=$?
secs="$(since "$start")"
echo "get DEAD1,DEAD2 --timeout 1: exit $status in $secs s (target: exit 1 within 2 s): $(tail -n1 "$tmp/dd.err")"
