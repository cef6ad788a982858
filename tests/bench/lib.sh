# Shared by the benchmark scripts (sourced from the repository root): free ports, waiting for them, a throwaway docker-registry,
# and pushing blobs and manifests to it with curl.

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; return 1; }

# start_registry DIR PORT [access]: a registry with storage under DIR, quiet logs (with
# `access`, its access log is on, to count requests).
start_registry() {
  local accesslog=true
  [ "${3:-}" = access ] && accesslog=false
  cat > "$1/registry.yml" <<YML
version: 0.1
log: { level: error, accesslog: { disabled: $accesslog } }
storage: { filesystem: { rootdirectory: $1/storage } }
http: { addr: 127.0.0.1:$2 }
YML
  docker-registry serve "$1/registry.yml" >"$1/registry.log" 2>&1 &
  wait_port "$2"
}

# push_blob PORT REPO FILE DIGEST: a monolithic upload.
push_blob() {
  local loc sep
  loc=$(curl -fsS -D - -o /dev/null -X POST "http://127.0.0.1:$1/v2/$2/blobs/uploads/" | tr -d '\r' | awk -F': ' 'tolower($1)=="location"{print $2}')
  case "$loc" in http*) ;; *) loc="http://127.0.0.1:$1$loc";; esac
  sep='?'; case "$loc" in *\?*) sep='&';; esac
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$3" "$loc${sep}digest=$4"
}

# push_image PORT REPO TAG WORKDIR [LAYER_FILE]: an empty config, the layer if given, a manifest.
push_image() {
  local cdigest layers=""
  printf '{}' > "$4/config"; cdigest="sha256:$(sha256sum "$4/config" | cut -d' ' -f1)"
  push_blob "$1" "$2" "$4/config" "$cdigest"
  if [ -n "${5:-}" ]; then
    local ldigest size
    ldigest="sha256:$(sha256sum "$5" | cut -d' ' -f1)"; size=$(stat -c %s "$5")
    push_blob "$1" "$2" "$5" "$ldigest"
    layers=$(printf '{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}' "$ldigest" "$size")
  fi
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":2},"layers":[%s]}' \
    "$cdigest" "$layers" > "$4/manifest"
  curl -fsS -o /dev/null -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    --data-binary "@$4/manifest" "http://127.0.0.1:$1/v2/$2/manifests/$3"
}

# start_nginx DIR PORT DIRECTIVES…: nginx on 127.0.0.1:PORT in the foreground of a background
# job, its files under DIR, with the given directives inside its one server block.
start_nginx() {
  local dir=$1 nport=$2
  shift 2
  chmod 755 "$dir"   # nginx's workers run unprivileged
  cat > "$dir/nginx.conf" <<CONF
daemon off;
worker_processes 1;
error_log $dir/nginx.error.log;
pid $dir/nginx.pid;
events { worker_connections 256; }
http {
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path $dir/nginx-body;
  proxy_temp_path $dir/nginx-proxy;
  fastcgi_temp_path $dir/nginx-fastcgi;
  uwsgi_temp_path $dir/nginx-uwsgi;
  scgi_temp_path $dir/nginx-scgi;
  server { listen 127.0.0.1:$nport; $* }
}
CONF
  nginx -c "$dir/nginx.conf" -p "$dir" &
  wait_port "$nport"
}

# rounds N URL…: N rounds of one GET of each URL in turn (so drift hits all alike); prints
# one line per URL: "best median" in MiB/s.
rounds() {
  python3 - "$@" <<'PY'
import statistics, subprocess, sys
n, urls = int(sys.argv[1]), sys.argv[2:]
speeds = {u: [] for u in urls}
for _ in range(n):
    for u in urls:
        out = subprocess.run(["curl", "-fsS", "-o", "/dev/null", "-w", "%{speed_download}", u],
                             capture_output=True, text=True, check=True).stdout
        speeds[u].append(float(out) / 1048576)
for u in urls:
    print(f"{max(speeds[u]):.0f} {statistics.median(speeds[u]):.0f}")
PY
}

# rate ARGS…: ApacheBench's requests per second.
rate() { ab -q "$@" | awk '/Requests per second/{printf "%.0f", $4}'; }

# best_pair CMD_A CMD_B: runs the two rate commands alternately three times and prints the
# best of each ("A B"), so drift in the shared registry hits both sides alike.
best_pair() {
  local a b best_a=0 best_b=0
  for _ in 1 2 3; do
    a=$(eval "$1"); b=$(eval "$2")
    [ "$a" -gt "$best_a" ] && best_a=$a
    [ "$b" -gt "$best_b" ] && best_b=$b
  done
  echo "$best_a $best_b"
}

# best_speed URL: the best of five GETs, in MiB/s.
best_speed() {
  local best=0 s
  for _ in 1 2 3 4 5; do
    s=$(curl -fsS -o /dev/null -w '%{speed_download}' "$1")
    best=$(python3 -c "print(max($best, $s/1048576))")
  done
  printf '%.0f' "$best"
}

# ratio A B: B/A as "0.00×".
ratio() { python3 -c "print(f'{$2/$1:.2f}×')"; }

# prepare "APT PACKAGES" TOOL…: checks the tools are there, builds the release binary, and
# makes $work, a scratch directory removed (with every background job killed) on exit.
prepare() {
  local packages=$1 tool
  shift
  for tool in "$@"; do
    command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install -y $packages)"; exit 1; }
  done
  cargo build --release --bin ocigate >/dev/null
  work=$(mktemp -d)
  trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
}
