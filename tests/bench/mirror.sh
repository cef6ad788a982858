#!/usr/bin/env bash
# On-demand benchmark (not part of `cargo test`): the forward proxy on 127.0.0.1, release
# build, against nginx on the same machine in the same run. Prints a Markdown table.
#
#   bash tests/bench/mirror.sh
#
# - a cache-hit 200 MiB blob GET over an intercepted TLS connection (CONNECT, TLS by the
#   minted leaf, HTTP/1.1) vs nginx serving the same file over TLS (best of 7, alternating);
# - new connections per second at 16 concurrent clients, each CONNECT + TLS handshake +
#   `GET /v2/` (c/image opens a CONNECT per request) vs TLS handshake + `GET /v2/` on nginx;
# - what the first CONNECT to a host not minted yet adds (median over 40 hosts);
# - ocigate's RSS with 1,000 intercepted connections open.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
prepare "docker-registry nginx-light curl openssl" docker-registry nginx curl python3 openssl
ulimit -n 8192

rport=$(port); gport=$(port); pport=$(port); nport=$(port); sport=$(port)
start_registry "$work" "$rport"
hosts=$(python3 -c 'print(",".join(f"h{i}.test" for i in range(40)))')
{
  echo "server: { listen: \"127.0.0.1:$gport\" }"
  echo "cache: { dir: \"$work/cache\", max_size: 4GiB }"
  echo "upstreams: { reg: { url: \"http://127.0.0.1:$rport\" } }"
  echo "routes:"
  echo "  - { host: quay.test, upstream: reg, cache: true }"
  for h in ${hosts//,/ }; do echo "  - { host: $h, upstream: reg }"; done
  echo "forward_proxy: { listen: \"127.0.0.1:$pport\", ca: { dir: \"$work/ca\" } }"
} > "$work/ocigate.yaml"
OCIGATE_LOG=warn target/release/ocigate serve --config "$work/ocigate.yaml" >"$work/ocigate.log" 2>&1 &
echo $! > "$work/ocigate.pid"
wait_port "$pport"
ca="$work/ca/ca.crt"

# nginx with a certificate of the same kind (P-256) for quay.test, serving the blob and /v2/.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=quay.test \
  -addext subjectAltName=DNS:quay.test -keyout "$work/nginx.key" -out "$work/nginx.crt" 2>/dev/null
mkdir -p "$work/www"
start_nginx "$work" "$nport" "listen 127.0.0.1:$sport ssl; ssl_certificate $work/nginx.crt; ssl_certificate_key $work/nginx.key; root $work/www; location = /v2/ { return 200 '{}'; }"

head -c $((200 << 20)) /dev/urandom > "$work/www/blob"
digest="sha256:$(sha256sum "$work/www/blob" | cut -d' ' -f1)"
push_image "$rport" team/big v1 "$work" "$work/www/blob"
via_proxy=(--proxy "http://127.0.0.1:$pport" --cacert "$ca")
blob="https://quay.test/v2/team/big/blobs/$digest"
curl -fsS -o /dev/null "${via_proxy[@]}" "$blob"   # fill the cache

read -r ocigate_blob nginx_blob < <(python3 - "$pport" "$ca" "$blob" "$sport" "$work/nginx.crt" <<'PY'
import subprocess, sys
pport, ca, blob, nport, ncrt = sys.argv[1:]
def speed(args):
    out = subprocess.run(["curl", "-fsS", "--http1.1", "-o", "/dev/null", "-w", "%{speed_download}", *args],
                         capture_output=True, text=True, check=True).stdout
    return float(out) / 1048576
o, n = [], []
for _ in range(7):
    o.append(speed(["--proxy", f"http://127.0.0.1:{pport}", "--cacert", ca, blob]))
    n.append(speed(["--cacert", ncrt, "--resolve", f"quay.test:{nport}:127.0.0.1", f"https://quay.test:{nport}/blob"]))
print(f"{max(o):.0f} {max(n):.0f}")
PY
)

# Certificates and handshakes: best of three alternating 5-second runs each.
best_o=0; best_n=0
for _ in 1 2 3; do
  o=$(python3 tests/bench/handshakes.py rate "127.0.0.1:$pport" quay.test:443 "$ca" 5 16)
  n=$(python3 tests/bench/handshakes.py rate - "quay.test:$sport" "$work/nginx.crt" 5 16)
  [ "$o" -gt "$best_o" ] && best_o=$o
  [ "$n" -gt "$best_n" ] && best_n=$n
done
read -r mint_first mint_again < <(python3 tests/bench/handshakes.py mint "127.0.0.1:$pport" "$hosts" "$ca")
read -r rss_now rss_peak < <(python3 tests/bench/handshakes.py hold "127.0.0.1:$pport" quay.test "$ca" 1000 "$work/ocigate.pid")

cat <<TABLE
| benchmark | ocigate (forward proxy) | nginx | ratio | goal |
|---|---|---|---|---|
| cache-hit 200 MiB blob GET over TLS, best of 7 alternating (MiB/s) | $ocigate_blob | $nginx_blob | $(ratio "$nginx_blob" "$ocigate_blob") | ≥ 0.9× |
| new connections/s at 16 clients: CONNECT + TLS + \`GET /v2/\` vs TLS + \`GET /v2/\` | $best_o | $best_n | $(ratio "$best_n" "$best_o") | ≥ 0.8× |
| CONNECT + handshake to a host not minted yet / minted (ms, median of 40) | $mint_first / $mint_again | — | +$(python3 -c "print(f'{$mint_first-$mint_again:.2f}')") ms | < 5 ms added |
| RSS with 1,000 intercepted connections open, now / peak (MiB) | $rss_now / $rss_peak | — | — | report |
TABLE
