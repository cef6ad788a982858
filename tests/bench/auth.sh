#!/usr/bin/env bash
# On-demand benchmark (not part of `cargo test`): the cost of client authentication.
#
#   bash tests/bench/auth.sh
#
# Measures manifest HEAD requests/s (ApacheBench, 16 keep-alive connections, 20000 requests,
# best of three runs alternating between the two setups)
# through ocigate without auth and through ocigate with token auth presenting a valid token
# (steady state: the verified-token cache); the same for `GET /v2/`, which ocigate answers
# itself, to isolate the auth stage; and token issuance per second from the built-in
# token server: anonymous (signing only) and with an htpasswd password (bcrypt cost 10).
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/bench/lib.sh
prepare "docker-registry apache2-utils curl openssl" docker-registry ab curl python3 openssl htpasswd
bin=target/release/ocigate

rport=$(port); open_port=$(port); auth_port=$(port)
start_registry "$work" "$rport"
push_image "$rport" team/app v1 "$work"

openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$work/token.key"
openssl req -new -x509 -key "$work/token.key" -subj /CN=bench -days 2 -out "$work/token.crt" 2>/dev/null
htpasswd -Bbn -C 10 bench benchpass > "$work/htpasswd"
common="upstreams: { reg: { url: \"http://127.0.0.1:$rport\" } }
routes: [ { prefix: \"mirror/\", upstream: reg, remote: \"team/\" } ]"
printf 'server: { listen: "127.0.0.1:%s" }\n%s\n' "$open_port" "$common" > "$work/open.yaml"
cat > "$work/auth.yaml" <<YML
server: { listen: "127.0.0.1:$auth_port" }
$common
auth: { token: { service: bench, issuer: bench } }
token_server:
  issuer: bench
  signing_key: $work/token.key
  certificate: $work/token.crt
  users: { htpasswd: $work/htpasswd }
  acl:
    - { account: "*", repository: "mirror/*", actions: [pull] }
YML
OCIGATE_LOG=warn $bin serve --config "$work/open.yaml" >"$work/open.log" 2>&1 &
OCIGATE_LOG=warn $bin serve --config "$work/auth.yaml" >"$work/auth.log" 2>&1 &
wait_port "$open_port"; wait_port "$auth_port"
token=$($bin token --config "$work/auth.yaml" --account bench --scope repository:mirror/app:pull)

accept='Accept: application/vnd.oci.image.manifest.v1+json'
read -r open_head auth_head < <(best_pair \
  "rate -i -k -c 16 -n 20000 -H '$accept' http://127.0.0.1:$open_port/v2/mirror/app/manifests/v1" \
  "rate -i -k -c 16 -n 20000 -H '$accept' -H 'Authorization: Bearer $token' http://127.0.0.1:$auth_port/v2/mirror/app/manifests/v1")
read -r open_base auth_base < <(best_pair \
  "rate -k -c 16 -n 50000 http://127.0.0.1:$open_port/v2/" \
  "rate -k -c 16 -n 50000 -H 'Authorization: Bearer $token' http://127.0.0.1:$auth_port/v2/")
anon_tokens=$(rate -k -c 16 -n 20000 "http://127.0.0.1:$auth_port/token?service=bench&scope=repository:mirror/app:pull")
basic=$(printf 'bench:benchpass' | base64)
pw_tokens=$(rate -k -c 16 -n 200 -H "Authorization: Basic $basic" "http://127.0.0.1:$auth_port/token?service=bench&scope=repository:mirror/app:pull")

echo "| benchmark | without auth | with token auth | ratio | goal |"
echo "|---|---|---|---|---|"
echo "| manifest HEAD, 16 connections (req/s) | $open_head | $auth_head | $(ratio "$open_head" "$auth_head") | ≥ 0.9× |"
echo "| GET /v2/ answered by ocigate, 16 connections (req/s) | $open_base | $auth_base | $(ratio "$open_base" "$auth_base") | (auth stage alone) |"
echo "| tokens issued per second, anonymous | — | $anon_tokens | — | — |"
echo "| tokens issued per second, htpasswd password (bcrypt cost 10) | — | $pw_tokens | — | — |"
