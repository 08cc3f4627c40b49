#!/usr/bin/env bash
# The sale path as three processes on one machine: `pingate server` (SQLite), `pingate gateway` and
# `pingate-load`, with each process's CPU per answered request (`pingate-load --cpu`), beside the same run's echo.
#
#   tools/bench/three-processes.sh [BIN_DIR] [MODE] [SECONDS] [RATE]
#     BIN_DIR  release binaries (default target/release; build with `cargo build --release`)
#     MODE     prefetch (closed loop, cache hits) | ondemand (closed loop) | open (prefetch at RATE/s)
#   env: WORK (default /tmp/pingate-bench), GW_ENV/SERVER_ENV (VAR=value for either process), FILL (PINs cached before
#        the run starts, default LOW), LOW/HIGH (the cache's marks, default 50000/200000; the demo's are 20/200),
#        CONNECTIONS (32), IN_FLIGHT (4), ECHO=1 to run the echo ceiling first, MAC=1 to keep the demo's MACs
#
# The first run makes an inventory of 1.2 million PINs (a few minutes) and keeps it as a template.
set -euo pipefail
T=${1:-target/release}; MODE=${2:-prefetch}; SECS=${3:-10}; RATE=${4:-6000}
T=$(cd "$T" && pwd)
W=${WORK:-/tmp/pingate-bench}; D=$W/run
mkdir -p "$W"
pkill -f "pingate (server|gateway).*$D" 2>/dev/null || true
rm -rf "$D"
if [ ! -d "$W/template" ]; then
    mkdir -p "$D"
    (timeout 60 "$T/pingate" demo --dir "$D" --keep-running --terminals 64 >"$W/demo.log" 2>&1 &)
    for _ in $(seq 1 120); do grep -q 'running until' "$W/demo.log" 2>/dev/null && break; sleep 0.5; done
    pkill -f "pingate demo --dir $D" || true
    sleep 0.5
    python3 - "$W/pins.csv" <<'PY'
import random, sys
with open(sys.argv[1], 'w') as f:
    f.write('product,amount,pin,serial,expiry,receipt\n')
    for i in range(900000):
        f.write(f'TOPUP-EU-10,1000,{random.randrange(10**15,10**16)},T{i:011d},20301231,Dial *100*PIN#\n')
    for i in range(300000):
        f.write(f'GIFT-25,2500,{random.randrange(10**15,10**16)},G{i:011d},20301231,Redeem online\n')
PY
    "$T/pingate" pins import --db "sqlite:$D/pins.db" --pin-keys "$D/certs/server/pin-keys" "$W/pins.csv" >/dev/null
    rm -f "$W/pins.csv"
    mv "$D" "$W/template"
fi
cp -r "$W/template" "$D"
cd "$D"
sed -i "s/^bind = \"127.0.0.1:0\"/bind = \"127.0.0.1:17000\"/; s/addr = \"127.0.0.1:[0-9]*\"/addr = \"127.0.0.1:17443\"/; s/^low = 20\$/low = ${LOW:-50000}/; s/^high = 200\$/high = ${HIGH:-200000}/" gateway-demo-gw.toml
sed -i 's|^\[gateway\]|[gateway]\nadmin = "./admin.sock"|; s|^dialect = "iso87-ascii-binbitmap"|dialect = "iso87-ascii-binbitmap"\nmax_in_flight = 64|' gateway-demo-gw.toml
# The demo's listener requires MACs. MAC=1 keeps that, and the load generator signs with the demo's keys, reporting
# the MAC's cost; without it the listener takes unsigned requests, as in the figures of issue 19.
if [ -n "${MAC:-}" ]; then
    [ -f terminal-keys.toml ] || { echo "MAC=1: this template has no terminal keys; remove $W/template" >&2; exit 2; }
else
    sed -i '/^mac = "required"$/d; /^mac_algorithm = /d' gateway-demo-gw.toml
fi
env ${SERVER_ENV:-} "$T/pingate" server --db sqlite:pins.db --cert certs/server/server.pem --key certs/server/server.key \
    --client-ca certs/server/ca.pem --gateways certs/server/gateways.toml --pin-keys certs/server/pin-keys \
    --listen 127.0.0.1:17443 --log-level warn >"$W/server.log" 2>&1 &
SP=$!
sleep 0.5
env ${GW_ENV:-} "$T/pingate" gateway --config gateway-demo-gw.toml --log-level warn >"$W/gateway.log" 2>&1 &
GP=$!
# Each run waits for the gateway's shutdown (it gives its cache back to the server) and the server's exit: a
# process still exiting would take CPU from the next run.
trap 'kill $GP 2>/dev/null; wait $GP 2>/dev/null; kill $SP 2>/dev/null; wait $SP 2>/dev/null || true' EXIT
cached() {
    "$T/pingate" gateway stock --admin ./admin.sock 2>/dev/null |
        python3 -c 'import json,sys; print(max(l["cached"] for l in json.load(sys.stdin)["cache"]))' 2>/dev/null || echo 0
}
for _ in $(seq 1 600); do [ "$(cached)" -ge "${FILL:-${LOW:-50000}}" ] && break; sleep 0.5; done
sleep 2
case $MODE in
    prefetch) ARGS=(--mix TOPUP-EU-10:1000 --in-flight "${IN_FLIGHT:-4}") ;;
    ondemand) ARGS=(--mix GIFT-25:2500 --in-flight "${IN_FLIGHT:-4}") ;;
    open) ARGS=(--mix TOPUP-EU-10:1000 --rate "$RATE") ;;
    *) echo "mode: prefetch, ondemand or open" >&2; exit 2 ;;
esac
[ -n "${ECHO:-}" ] && ARGS+=(--echo-ceiling)
[ -n "${MAC:-}" ] && ARGS+=(--mac-key-file terminal-keys.toml --kek-file terminal.kek)
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
r0=$(rss $GP)
"$T/pingate-load" run --gateway 127.0.0.1:17000 --connections "${CONNECTIONS:-32}" --duration "$SECS" "${ARGS[@]}" \
    --cpu gateway=$GP --cpu server=$SP --quiet --json "$W/load-$MODE.json"
echo "gateway RSS: $r0 KiB before the run, $(rss $GP) KiB after"
"$T/pingate" gateway stock --admin ./admin.sock 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
for l in d["cache"]:
    print("cache %s: %s cached, %s hits, %s misses; confirms waiting %s"
          % (l["product"], l["cached"], l.get("hits"), l.get("misses"), d["pending_confirms"]))'
