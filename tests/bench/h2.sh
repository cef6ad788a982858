#!/usr/bin/env bash
# On-demand benchmark (not part of `cargo test`): HTTP/2 over a distant link, release build.
# A delay relay (tests/bench/delay.py, 25 ms each way) stands between the peers; everything
# else is on 127.0.0.1. Prints a Markdown table for the README.
#
#   bash tests/bench/h2.sh
#
# Measures, best of three (seconds):
# - 4 concurrent GETs of 64 MiB blobs from an HTTPS registry 50 ms away: straight from it and
#   through ocigate (the upstream hop is the distant one, one multiplexed HTTP/2 connection);
# - a 64 MiB monolithic upload over HTTP/2 from a client 50 ms away: straight to the registry
#   and through ocigate's TLS listener.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
prepare "docker-registry openssl curl" docker-registry openssl curl python3

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/cert.pem" -days 2 \
  -subj /CN=127.0.0.1 -addext "subjectAltName=IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" 2>/dev/null
rport=$(port); far_reg=$(port); gpull=$(port); gpush=$(port); far_gw=$(port)
cat > "$work/registry.yml" <<YML
version: 0.1
log: { level: error, accesslog: { disabled: true } }
storage: { filesystem: { rootdirectory: $work/storage } }
http: { addr: 127.0.0.1:$rport, tls: { certificate: $work/cert.pem, key: $work/key.pem } }
YML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
wait_port "$rport"
gateway() { # PORT UPSTREAM_PORT
  cat > "$work/ocigate-$1.yaml" <<YML
server: { listen: "127.0.0.1:$1", tls: { cert: $work/cert.pem, key: $work/key.pem } }
upstreams: { reg: { url: "https://127.0.0.1:$2", ca: $work/cert.pem } }
routes: [ { prefix: "m/", upstream: reg, remote: "team/" } ]
YML
  OCIGATE_LOG=warn target/release/ocigate serve --config "$work/ocigate-$1.yaml" >"$work/ocigate-$1.log" 2>&1 &
  wait_port "$1"
}
gateway "$gpull" "$far_reg"   # pulls: the registry is far from ocigate
gateway "$gpush" "$rport"     # pushes: the client is far from ocigate
python3 tests/bench/delay.py "$far_reg" "$rport" 0.025 &
python3 tests/bench/delay.py "$far_gw" "$gpush" 0.025 &
wait_port "$far_reg"; wait_port "$far_gw"

upload() { # BASE_URL REPO FILE DIGEST: POST, then one PUT of the whole file
  local loc
  loc=$(curl -kfsS --http2 -D - -o /dev/null -X POST "$1/v2/$2/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  loc="$1/v2/${loc#*/v2/}"   # the proxy's Location names its own port; go through the relay
  curl -kfsS --http2 -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$3" "$loc&digest=$4"
}
digests=()
for i in 1 2 3 4; do
  head -c $((64 << 20)) /dev/urandom > "$work/blob$i"
  digests+=("sha256:$(sha256sum "$work/blob$i" | cut -d' ' -f1)")
  upload "https://127.0.0.1:$rport" team/b "$work/blob$i" "${digests[-1]}"
done

seconds() { local s e; s=$(date +%s.%N); "$@"; e=$(date +%s.%N); python3 -c "print($e - $s)"; }
best3() { local best=999 t; for _ in 1 2 3; do t=$(seconds "$@"); best=$(python3 -c "print(min($best, $t))"); done; printf '%.2f' "$best"; }
pull4() { # BASE_URL REPO
  local pids=() d
  for d in "${digests[@]}"; do curl -kfsS --http2 -o /dev/null "$1/v2/$2/blobs/$d" & pids+=($!); done
  wait "${pids[@]}"
}
# The registry takes the whole body again although it has the blob.
push1() { upload "$1" "$2" "$work/blob1" "${digests[0]}"; }

direct_pull=$(best3 pull4 "https://127.0.0.1:$far_reg" team/b)
proxy_pull=$(best3 pull4 "https://127.0.0.1:$gpull" m/b)
direct_push=$(best3 push1 "https://127.0.0.1:$far_reg" team/up)
proxy_push=$(best3 push1 "https://127.0.0.1:$far_gw" m/up)

echo "| benchmark (50 ms round trip) | direct | through ocigate | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| 4 concurrent 64 MiB blob GETs, registry far from ocigate, best of 3 (s) | $direct_pull | $proxy_pull | $(ratio "$proxy_pull" "$direct_pull") | — |"
echo "| 64 MiB upload over HTTP/2, client far from ocigate, best of 3 (s) | $direct_push | $proxy_push | $(ratio "$proxy_push" "$direct_push") | — |"
