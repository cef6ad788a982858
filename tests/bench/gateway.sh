#!/usr/bin/env bash
# On-demand benchmark (not part of `cargo test`): the gateway against the real registry on
# 127.0.0.1, release build. Prints a Markdown table for the README.
#
#   bash tests/bench/gateway.sh
#
# Measures: a 200 MiB blob GET through ocigate vs straight from docker-registry, and through
# nginx as a reference reverse proxy (15 alternating rounds, best and median), manifest HEAD
# requests/s at 16 keep-alive connections (ApacheBench `ab -i`, 20000 requests, best of three
# alternating runs; wrk cannot measure HEAD: it waits for a body), and ocigate's peak RSS
# while serving 64 concurrent downloads of that blob.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
prepare "docker-registry nginx-light apache2-utils curl" docker-registry nginx ab curl python3

rport=$(port); gport=$(port); nport=$(port)
start_registry "$work" "$rport"
cat > "$work/ocigate.yaml" <<YML
server: { listen: "127.0.0.1:$gport" }
upstreams: { reg: { url: "http://127.0.0.1:$rport" } }
routes: [ { prefix: "mirror/", upstream: reg, remote: "team/" } ]
YML
OCIGATE_LOG=warn target/release/ocigate serve --config "$work/ocigate.yaml" >"$work/ocigate.log" 2>&1 &
gpid=$!
wait_port "$gport"
# nginx proxying the same prefix, with the buffers that served it best here (1 MiB reads).
start_nginx "$work" "$nport" "location /v2/mirror/ { proxy_pass http://127.0.0.1:$rport/v2/team/;
  proxy_http_version 1.1; proxy_buffers 8 1m; proxy_buffer_size 1m; proxy_busy_buffers_size 2m;
  proxy_max_temp_file_size 0; }"

# A 200 MiB blob in an image, pushed straight to the registry.
head -c $((200 << 20)) /dev/urandom > "$work/blob"
digest="sha256:$(sha256sum "$work/blob" | cut -d' ' -f1)"
push_image "$rport" team/bench v1 "$work" "$work/blob"

{ read -r direct_best direct_median; read -r proxy_best proxy_median; read -r nginx_best nginx_median; } < <(rounds 15 \
  "http://127.0.0.1:$rport/v2/team/bench/blobs/$digest" \
  "http://127.0.0.1:$gport/v2/mirror/bench/blobs/$digest" \
  "http://127.0.0.1:$nport/v2/mirror/bench/blobs/$digest")

head_rate() { # url → requests/s
  rate -i -k -c 16 -n 20000 -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$1"
}
read -r direct_head proxy_head < <(best_pair \
  "head_rate http://127.0.0.1:$rport/v2/team/bench/manifests/v1" \
  "head_rate http://127.0.0.1:$gport/v2/mirror/bench/manifests/v1")

# Peak RSS while 64 clients download the blob at once.
downloads=()
for _ in $(seq 64); do
  curl -fsS -o /dev/null "http://127.0.0.1:$gport/v2/mirror/bench/blobs/$digest" &
  downloads+=($!)
done
wait "${downloads[@]}"
peak_kib=$(awk '/VmHWM/{print $2}' "/proc/$gpid/status")

echo "| benchmark | direct | through ocigate | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| 200 MiB blob GET, best of 15 alternating (MiB/s) | $direct_best | $proxy_best | $(ratio "$direct_best" "$proxy_best") | ≥ 0.9× |"
echo "| 200 MiB blob GET, median of those 15 (MiB/s) | $direct_median | $proxy_median | $(ratio "$direct_median" "$proxy_median") | |"
echo "| reference: the same GETs through nginx, best / median (MiB/s) | — | $nginx_best / $nginx_median | $(ratio "$direct_best" "$nginx_best") / $(ratio "$direct_median" "$nginx_median") | |"
echo "| manifest HEAD, 16 connections (req/s) | $direct_head | $proxy_head | $(ratio "$direct_head" "$proxy_head") | ≥ 0.7× |"
echo "| peak RSS, 64 concurrent 200 MiB downloads | — | $((peak_kib / 1024)) MiB | — | < 64 MiB |"
