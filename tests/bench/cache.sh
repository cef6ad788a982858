#!/usr/bin/env bash
# On-demand benchmark (not part of `cargo test`): the pull-through cache against the real
# registry and nginx on 127.0.0.1, release build. Prints a Markdown table for the README.
#
#   bash tests/bench/cache.sh
#
# Measures, all in one run:
# - a cache-hit 200 MiB blob GET (best of 5) vs nginx serving the same file with sendfile
#   and vs straight from docker-registry;
# - cache-hit manifest GETs/s at 16 keep-alive connections vs the registry's (best of three
#   alternating runs);
# - 16 concurrent cold GETs of another 200 MiB layer through an empty cache vs 16 concurrent
#   GETs straight from the registry: wall time, and the upstream GETs the cache made (from the
#   registry's access log);
# - ocigate's peak RSS (mapped cache files count, though they are page cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
prepare "docker-registry nginx-light apache2-utils curl" docker-registry nginx ab curl python3

rport=$(port); gport=$(port); nport=$(port)
start_registry "$work" "$rport" access
cat > "$work/ocigate.yaml" <<YML
server: { listen: "127.0.0.1:$gport" }
cache: { dir: "$work/cache", max_size: 4GiB, tag_ttl: 1h }
upstreams: { reg: { url: "http://127.0.0.1:$rport" } }
routes: [ { prefix: "c/", upstream: reg, remote: "team/", cache: true } ]
YML
OCIGATE_LOG=warn target/release/ocigate serve --config "$work/ocigate.yaml" >"$work/ocigate.log" 2>&1 &
gpid=$!
wait_port "$gport"

mkdir -p "$work/www"
chmod 755 "$work/www"
start_nginx "$work" "$nport" "root $work/www;"

head -c $((200 << 20)) /dev/urandom > "$work/www/blob"
digest="sha256:$(sha256sum "$work/www/blob" | cut -d' ' -f1)"
push_image "$rport" team/bench v1 "$work" "$work/www/blob"
curl -fsS -o /dev/null "http://127.0.0.1:$gport/v2/c/bench/blobs/$digest"   # fill the cache
accept='Accept: application/vnd.oci.image.manifest.v1+json'
curl -fsS -o /dev/null -H "$accept" "http://127.0.0.1:$gport/v2/c/bench/manifests/v1"

nginx_blob=$(best_speed "http://127.0.0.1:$nport/blob")
direct_blob=$(best_speed "http://127.0.0.1:$rport/v2/team/bench/blobs/$digest")
cache_blob=$(best_speed "http://127.0.0.1:$gport/v2/c/bench/blobs/$digest")

get_rate() { rate -k -c 16 -n 20000 -H "$accept" "$1"; }
read -r direct_manifest cache_manifest < <(best_pair \
  "get_rate http://127.0.0.1:$rport/v2/team/bench/manifests/v1" \
  "get_rate http://127.0.0.1:$gport/v2/c/bench/manifests/v1")

# Cold: a layer nobody has fetched, 16 clients at once, straight and through the cache.
head -c $((200 << 20)) /dev/urandom > "$work/cold"
cdigest="sha256:$(sha256sum "$work/cold" | cut -d' ' -f1)"
push_image "$rport" team/cold v1 "$work" "$work/cold"
sixteen() { # url → seconds for 16 concurrent GETs
  python3 - "$1" <<'PY'
import subprocess, sys, time
start = time.monotonic()
ps = [subprocess.Popen(["curl", "-fsS", "-o", "/dev/null", sys.argv[1]]) for _ in range(16)]
assert all(p.wait() == 0 for p in ps)
print(f"{time.monotonic() - start:.2f}")
PY
}
gets() { grep -c "\"GET /v2/team/cold/blobs/$cdigest" "$work/registry.log" || true; }
direct_cold=$(sixteen "http://127.0.0.1:$rport/v2/team/cold/blobs/$cdigest")
before=$(gets)
cache_cold=$(sixteen "http://127.0.0.1:$gport/v2/c/cold/blobs/$cdigest")
upstream_gets=$(( $(gets) - before ))
# Includes the pages of mapped objects, which are the kernel's page cache, not heap.
peak_kib=$(awk '/VmHWM/{print $2}' "/proc/$gpid/status")
anon_kib=$(awk '/RssAnon/{print $2}' "/proc/$gpid/status")

echo "| benchmark | baseline | through the cache | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| cache-hit 200 MiB blob GET vs nginx sendfile, best of 5 (MiB/s) | $nginx_blob | $cache_blob | $(ratio "$nginx_blob" "$cache_blob") | ≥ 0.9× |"
echo "| cache-hit 200 MiB blob GET vs docker-registry, best of 5 (MiB/s) | $direct_blob | $cache_blob | $(ratio "$direct_blob" "$cache_blob") | ≥ 1× |"
echo "| cache-hit manifest GET, 16 connections (req/s) | $direct_manifest | $cache_manifest | $(ratio "$direct_manifest" "$cache_manifest") | ≥ 5× |"
echo "| 16 concurrent cold GETs of a 200 MiB layer (s) | $direct_cold | $cache_cold | $(ratio "$direct_cold" "$cache_cold") | ≤ 1.3× |"
echo "| upstream GETs for those 16 cold GETs | 16 | $upstream_gets | — | 1 |"
echo "| ocigate peak RSS over the run (of it anonymous at the end) | — | $((peak_kib / 1024)) MiB ($((anon_kib / 1024)) MiB) | — | — |"
