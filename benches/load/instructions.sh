#!/usr/bin/env bash
# Instructions per forwarded GET, counted by callgrind: portcullis (policy
# on, access log off, one worker thread) beside nginx as a keep-alive reverse
# proxy. Unlike CPU time, the count does not move with what else the machine
# is doing, so two builds can be compared to the percent. From the
# repository:
#
#     bash benches/load/instructions.sh [BIN]
#
# Each proxy serves N1 and then N2 GETs on one keep-alive connection from
# python's http.client; the difference of the two totals over N2 - N1 is the
# per-request figure (start-up and shutdown cancel out). Needs valgrind,
# nginx, python3 and curl (installed when missing).
#
# MODE=inspect counts portcullis alone, four ways: GETs and 1 KiB JSON
# POSTs, each with [scan] off and with action = "deny" (the cost of secret
# scanning per request, headers and body).
#
# MODE=log counts portcullis alone with the access log off and on (text
# lines, written to a file).
#
# MODE=profiles counts portcullis alone, GETs from proxy user p0
# (Proxy-Authorization: Basic) three ways: no profiles (p0 the [auth]
# user), one profile, and 100 profiles (each with its user and a source
# range): what choosing a profile costs, and that it does not grow with
# their number.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
N1=${N1:-500}; N2=${N2:-2500}
need=""; for t in valgrind nginx python3 curl; do command -v $t >/dev/null || need="$need $t"; done
if [ -n "$need" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(echo "$need" | sed 's/nginx/nginx-light/')) >/dev/null
fi
BIN=${1:-}
if [ -z "$BIN" ]; then (cd "$repo" && cargo build --release --quiet); BIN="$repo/target/release/portcullis"; fi
W=$(mktemp -d); chmod 755 "$W"; mkdir -p "$W/logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
cat > "$W/origin.conf" <<NG
worker_processes 1; daemon off; pid $W/origin.pid; error_log $W/logs/o.log crit;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000; server { listen 127.0.0.1:28080; location = / { return 200 "ok\n"; } } }
NG
cat > "$W/rp.conf" <<NG
worker_processes 1; daemon off; master_process off; pid $W/rp.pid; error_log $W/logs/rp.log crit;
events { worker_connections 1024; }
http { access_log off; keepalive_requests 1000000;
  upstream o { server 127.0.0.1:28080; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:28081; location / { proxy_pass http://o; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NG
nginx -c "$W/origin.conf" -p "$W" & pids+=($!)
cat > "$W/drive.py" <<'PY'
import http.client, json, sys
port, n, absolute = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] != "rev"
post = sys.argv[3] == "post"
auth = {"Proxy-Authorization": "Basic cDA6cHctcDA="} if sys.argv[3] == "auth" else {}
c = http.client.HTTPConnection("127.0.0.1", port)
target = "http://127.0.0.1:28080/" if absolute else "/"
# A 1 KiB JSON body of ordinary text: nothing in it is a secret.
body = json.dumps({"message": "git status: nothing to commit, working tree clean " * 15,
                   "id": "6f1c2a9e-3b7d-4c51-9a0e-1d2b3c4d5e6f"})[:1024].ljust(1024).encode()
for _ in range(n):
    if post:
        c.request("POST", target, body=body,
                  headers={"Host": "127.0.0.1:28080", "Content-Type": "application/json"})
    else:
        c.request("GET", target, headers={"Host": "127.0.0.1:28080", **auth})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY
# count NAME PORT FORM N COMMAND...: the instructions of COMMAND serving N GETs.
count() {
  local port=$1 form=$2 n=$3; shift 3
  valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p" "$@" >/dev/null 2>"$W/vg.err" & local pid=$!
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.2; done
  python3 "$W/drive.py" "$port" "$n" "$form"
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  awk '/^totals:/ {print $2}' "$W/cg.$pid"
}
us() { PORTCULLIS_THREADS=1 PORTCULLIS_LOG=warn count 28199 abs "$1" "$BIN" serve --http 127.0.0.1:28199 --no-socks --allow 127.0.0.1; }
if [ "${MODE:-}" = inspect ]; then
  for action in off deny; do
    printf '[network]\nallowed_domains = ["127.0.0.1"]\n\n[scan]\naction = "%s"\n' "$action" > "$W/$action.toml"
  done
  # one ACTION FORM N: portcullis with [scan] action = ACTION serving N requests.
  one() { PORTCULLIS_THREADS=1 PORTCULLIS_LOG=warn count 28199 "$2" "$3" "$BIN" serve --http 127.0.0.1:28199 --no-socks --config "$W/$1.toml"; }
  declare -A per
  for form in abs post; do
    for action in off deny; do
      a=$(one "$action" "$form" "$N1"); b=$(one "$action" "$form" "$N2")
      per[$form.$action]=$(( (b - a) / (N2 - N1) ))
    done
  done
  echo "instructions per request (callgrind, $((N2 - N1)) requests), [scan] off -> deny:"
  awk -v a="${per[abs.off]}" -v b="${per[abs.deny]}" -v c="${per[post.off]}" -v d="${per[post.deny]}" 'BEGIN{
    printf "  GET                %7d -> %7d  (%.2f×)\n", a, b, b/a
    printf "  1 KiB JSON POST    %7d -> %7d  (%.2f×)\n", c, d, d/c }'
  exit 0
fi
if [ "${MODE:-}" = log ]; then
  # The access log (text, to a file) off and on: what serve's default costs.
  one() { PORTCULLIS_THREADS=1 PORTCULLIS_LOG=$1 count 28199 abs "$2" "$BIN" serve --http 127.0.0.1:28199 --no-socks --allow 127.0.0.1; }
  off=$(( ($(one warn "$N2") - $(one warn "$N1")) / (N2 - N1) ))
  on=$(( ($(one info "$N2") - $(one info "$N1")) / (N2 - N1) ))
  echo "instructions per forwarded GET (callgrind, $((N2 - N1)) GETs), access log off -> on:"
  awk -v a="$off" -v b="$on" 'BEGIN{ printf "  %7d -> %7d  (%.2f×)\n", a, b, b/a }'
  exit 0
fi
if [ "${MODE:-}" = profiles ]; then
  # profiles N: a config with N profiles, each with a user pI (password
  # pw-pI) and a range of 10.I.0.0/16; N = 0: p0 is the [auth] user.
  profiles() {
    local n=$1 f="$W/profiles-$1.toml" i
    printf '[network]\nallowed_domains = ["127.0.0.1"]\n\n' > "$f"
    if [ "$n" = 0 ]; then printf '[auth]\nusername = "p0"\npassword = "pw-p0"\n' >> "$f"; fi
    for i in $(seq 0 $((n - 1))); do
      printf 'pw-p%d' "$i" > "$W/p$i.pw"
      printf '[[auth.users]]\nname = "p%d"\nprofile = "profile%d"\npassword = { file = "%s" }\n' "$i" "$i" "$W/p$i.pw" >> "$f"
    done
    for i in $(seq 0 $((n - 1))); do
      printf '[profiles.profile%d]\nsources = ["10.%d.0.0/16"]\n' "$i" "$i" >> "$f"
    done
    echo "$f"
  }
  one() { PORTCULLIS_THREADS=1 PORTCULLIS_LOG=warn count 28199 auth "$2" "$BIN" serve --http 127.0.0.1:28199 --no-socks --config "$1"; }
  declare -A per
  for n in 0 1 100; do
    f=$(profiles "$n"); a=$(one "$f" "$N1"); b=$(one "$f" "$N2")
    per[$n]=$(( (b - a) / (N2 - N1) ))
  done
  echo "instructions per forwarded GET from proxy user p0 (callgrind, $((N2 - N1)) GETs):"
  awk -v a="${per[0]}" -v b="${per[1]}" -v c="${per[100]}" 'BEGIN{
    printf "  no profiles      %7d\n  1 profile        %7d  (%+.1f%%)\n  100 profiles     %7d  (%+.1f%% against 1)\n", a, b, (b-a)*100/a, c, (c-b)*100/b }'
  exit 0
fi
rp() { count 28081 rev "$1" nginx -c "$W/rp.conf" -p "$W"; }
us1=$(us "$N1"); us2=$(us "$N2"); ng1=$(rp "$N1"); ng2=$(rp "$N2")
awk -v a="$us1" -v b="$us2" -v c="$ng1" -v d="$ng2" -v n=$((N2 - N1)) 'BEGIN{
  u=(b-a)/n; g=(d-c)/n
  printf "instructions per forwarded GET (callgrind, %d GETs): portcullis %.0f, nginx reverse proxy %.0f, ratio %.2f×\n", n, u, g, u/g }'
