#!/usr/bin/env bash
# The end-to-end load bench: portcullis against a direct connection, squid
# and tinyproxy, in one run, on loopback. One command, from the repository:
#
#     bash benches/load/run.sh
#
# It builds portcullis (release), installs nginx, squid, tinyproxy and wrk
# from the distribution when missing, starts an nginx origin and the
# proxies, and prints one table with the ratio to direct (and to squid).
# It also measures what a shared machine blurs least: each process's own
# CPU (user + system from /proc/PID/stat) per forwarded GET, per GB relayed
# and per tunnel opened, beside nginx and haproxy as keep-alive reverse
# proxies (the floor for a proxy that parses every request), squid and
# tinyproxy, and prints the ratios (the lower of ROUNDS rounds, 2); socat,
# a plain TCP relay, is the reference for CPU per GB; nginx terminating
# TLS and re-encrypting to the TLS origin is the reference for
# interception's CPU per HTTPS request (HTTP/1.1 and h2).
# Knobs: DUR (seconds per wrk run, 8), CONNS (50), BIG_MB (512), HANDSHAKES
# (10000), HOLD (tunnels held for RSS: 10000, or 9000 when the hard file
# limit is under 21000), BURSTS (10) of BURST (2000) active tunnels.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
DUR=${DUR:-8}; CONNS=${CONNS:-50}; BIG_MB=${BIG_MB:-512}
HANDSHAKES=${HANDSHAKES:-10000}; BURSTS=${BURSTS:-10}; BURST=${BURST:-2000}
# 10,000 held tunnels need two descriptors each in the proxy: fewer when
# the hard limit on open files is lower (9,000 under the common 20,000).
hard=$(ulimit -Hn); [ "$hard" = unlimited ] && hard=1048576
HOLD=${HOLD:-$(( hard >= 21000 ? 10000 : (hard - 1000) / 2 > 9000 ? 9000 : (hard - 1000) / 2 ))}

ROUNDS=${ROUNDS:-2}
need=""; for t in nginx tinyproxy squid wrk curl haproxy socat; do command -v $t >/dev/null || need="$need $t"; done
if [ -n "$need" ]; then
  echo "== installing:$need" >&2
  pk=$(echo "$need" | sed 's/nginx/nginx-light/')
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $pk) >/dev/null
fi
echo "== building portcullis and the tunnel prober (release)" >&2
(cd "$repo" && cargo build --release --quiet && cargo bench --bench tunnels --no-run --quiet 2>/dev/null)
PORTCULLIS="$repo/target/release/portcullis"
PROBER=$(cd "$repo" && cargo bench --bench tunnels --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*tunnels[^"]*\)".*/\1/p' | tail -1)

ulimit -n "$(ulimit -Hn)"
W=$(mktemp -d); chmod 755 "$W"; cd "$W"
ORIGIN=127.0.0.1:18080
ORIGIN_TLS=127.0.0.1:18443
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

mkdir -p www logs squid
head -c $((BIG_MB*1048576)) /dev/urandom > www/big
# An origin CA and a certificate for 127.0.0.1 (the interception row).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
  -days 2 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE >/dev/null 2>&1
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout tls.key -out tls.csr \
  -subj /CN=origin >/dev/null 2>&1
printf 'subjectAltName=IP:127.0.0.1,DNS:origin.test\n' > ext.cnf
openssl x509 -req -in tls.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out tls.pem -days 2 \
  -extfile ext.cnf >/dev/null 2>&1
cat > nginx.conf <<NG
worker_processes 1; daemon off; pid $W/nginx.pid; error_log $W/logs/nerr.log crit;
events { worker_connections 16384; }
http { access_log off; sendfile on; keepalive_requests 1000000;
  server { listen $ORIGIN; root $W/www; location = / { return 200 "ok\n"; } }
  server { listen $ORIGIN_TLS ssl http2; ssl_certificate $W/tls.pem; ssl_certificate_key $W/tls.key;
    location = / { return 200 "ok\n"; } } }
NG
nginx -c "$W/nginx.conf" -p "$W" & pids+=($!)
# nginx and haproxy as keep-alive reverse proxies in front of the origin,
# one worker each: the CPU-per-request anchors.
cat > rp.conf <<NG
worker_processes 1; daemon off; pid $W/rp.pid; error_log $W/logs/rp.log crit;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000;
  upstream o { server $ORIGIN; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18081; location / { proxy_pass http://o; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NG
nginx -c "$W/rp.conf" -p "$W" & pids+=($!)
# nginx doing interception's work: TLS (HTTP/1.1 and h2) terminated on a
# listener and re-encrypted to the TLS origin over kept connections,
# sessions resumed, the origin's certificate checked: the peer of the
# interception rows.
cat > tlsrp.conf <<NG
worker_processes 1; daemon off; pid $W/tlsrp.pid; error_log $W/logs/tlsrp.log crit;
events { worker_connections 16384; }
http { access_log off; keepalive_requests 1000000;
  upstream o { server $ORIGIN_TLS; keepalive 64; keepalive_requests 1000000; }
  server { listen 127.0.0.1:18444 ssl http2; ssl_certificate $W/tls.pem; ssl_certificate_key $W/tls.key;
    location / { proxy_pass https://o; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_session_reuse on; proxy_ssl_verify on; proxy_ssl_trusted_certificate $W/ca.pem;
      proxy_ssl_name origin.test; proxy_ssl_server_name on; } } }
NG
nginx -c "$W/tlsrp.conf" -p "$W" & pids+=($!)
cat > haproxy.cfg <<HA
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend f
  bind 127.0.0.1:18082
  default_backend b
backend b
  server o $ORIGIN
HA
haproxy -f "$W/haproxy.cfg" -db >/dev/null 2>&1 & pids+=($!); haproxy_pid=$!
cat > tinyproxy.conf <<TP
Port 18888
Listen 127.0.0.1
Timeout 600
MaxClients 16000
LogLevel Critical
Allow 127.0.0.1
DisableViaHeader Yes
TP
tinyproxy -d -c "$W/tinyproxy.conf" >/dev/null 2>&1 & pids+=($!); tinyproxy_pid=$!
cat > squid.conf <<SQ
http_port 127.0.0.1:13128
http_access allow localhost
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_log $W/squid/cache.log
pid_filename $W/squid/squid.pid
coredump_dir $W/squid
shutdown_lifetime 1 seconds
max_filedescriptors 65536
workers 1
SQ
squid -N -f "$W/squid.conf" >/dev/null 2>&1 & pids+=($!); squid_pid=$!
# socat as a plain TCP relay to the origin: the reference for CPU per GB
# (a process per connection, reaped, so its children's time counts).
socat TCP-LISTEN:18091,bind=127.0.0.1,reuseaddr,fork TCP:$ORIGIN >/dev/null 2>&1 & pids+=($!); socat_pid=$!
# The access log off (warn): what an operator who keeps it on pays is in
# the README's note.
PORTCULLIS_LOG=warn "$PORTCULLIS" serve --http 127.0.0.1:13129 --socks 127.0.0.1:11080 \
  --allow 127.0.0.1 >/dev/null 2>&1 & pids+=($!); portcullis_pid=$!
# A second portcullis in limited mode, intercepting (its CA in $W/pca).
printf '[mitm]\nca_dir = "%s/pca"\nupstream_ca_files = ["%s/ca.pem"]\n' "$W" "$W" > mitm.toml
PORTCULLIS_LOG=warn "$PORTCULLIS" serve --config mitm.toml --http 127.0.0.1:13130 --no-socks \
  --mode limited --mitm --allow 127.0.0.1 >/dev/null 2>&1 & pids+=($!); mitm_pid=$!
# A third, with the access log on (serve's default), for its CPU row.
"$PORTCULLIS" serve --http 127.0.0.1:13131 --no-socks --allow 127.0.0.1 >/dev/null 2>&1 & pids+=($!); logged_pid=$!
sleep 2
rp_pid=$(pgrep -P "$(cat "$W/rp.pid")" | head -1)
tlsrp_pid=$(pgrep -P "$(cat "$W/tlsrp.pid")" | head -1)

cat > abs.lua <<'LUA'
local target = os.getenv("ABS_URL")
wrk.headers["Host"] = target:match("^%a+://([^/]+)")
request = function() return wrk.format("GET", target) end
LUA
rps() {
  local out
  if [ "$1" = direct ]; then out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" "http://$ORIGIN/" 2>&1)
  else out=$(ABS_URL="http://$ORIGIN/" wrk -t1 -c"$CONNS" -d"${DUR}s" -s abs.lua "http://$1/" 2>&1); fi
  echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}'
}
bulk() {
  local s
  case "$2" in
    direct) s=$(curl -s -o /dev/null -w '%{speed_download}' "http://$ORIGIN/big");;
    socks) s=$(curl -s -o /dev/null -w '%{speed_download}' --socks5-hostname "$1" "http://$ORIGIN/big");;
    *) s=$(curl -s -p -o /dev/null -w '%{speed_download}' -x "http://$1" "http://$ORIGIN/big");;
  esac
  awk -v s="$s" 'BEGIN{printf "%.0f", s/1048576}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f×", a/b; else printf "-" }'; }
hz=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# CPU µs per GET of PID while wrk sends small keep-alive GETs to ADDR
# (abs: absolute-form, as to a forward proxy; rev: origin-form, as to a
# reverse proxy): prints "GETs/s µs".
cpu_gets() {
  local a b out n r
  a=$(ticks "$3")
  if [ "$1" = abs ]; then out=$(ABS_URL="http://$ORIGIN/" wrk -t1 -c"$CONNS" -d"${DUR}s" -s abs.lua "http://$2/" 2>&1)
  else out=$(wrk -t1 -c"$CONNS" -d"${DUR}s" "http://$2/" 2>&1); fi
  b=$(ticks "$3")
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  r=$(echo "$out" | awk '/Requests\/sec/ {printf "%.0f", $2}')
  # A refusal is cheaper than a forward: a run that measured refusals says so.
  echo "$out" | awk -v who="$2" '/Non-2xx/ {print "warning: " $NF " answers from " who " were not 2xx" > "/dev/stderr"}'
  awk -v a="$a" -v b="$b" -v n="${n:-0}" -v hz="$hz" -v r="${r:-0}" \
    'BEGIN{ if (n > 0) printf "%s %.1f", r, (b-a)/hz*1e6/n; else printf "0 0" }'
}
# The lower CPU of ROUNDS rounds (and its GETs/s).
best_cpu_gets() {
  local best="" line
  for _ in $(seq "$ROUNDS"); do
    line=$(cpu_gets "$@")
    if [ -z "$best" ] || awk -v a="${line#* }" -v b="${best#* }" 'BEGIN{exit !(a < b)}'; then best=$line; fi
  done
  echo "$best"
}
# CPU ms of PID per GB fetched through ADDR's CONNECT (or SOCKS5).
cpu_bulk() {
  local a b
  a=$(ticks "$3")
  if [ "$1" = socks ]; then curl -s -o /dev/null --socks5-hostname "$2" "http://$ORIGIN/big"
  else curl -s -p -o /dev/null -x "http://$2" "http://$ORIGIN/big"; fi
  b=$(ticks "$3")
  awk -v a="$a" -v b="$b" -v hz="$hz" -v mb="$BIG_MB" 'BEGIN{printf "%.0f", (b-a)/hz*1e3/(mb/1024)}'
}
tunnels() { "$PROBER" "$@"; }
# PID's CPU µs per request while the prober runs ARGS: prints "GETs/s µs".
cpu_tunnels() {
  local pid=$1 a b r; shift
  a=$(ticks "$pid"); r=$(tunnels "$@"); b=$(ticks "$pid")
  awk -v a="$a" -v b="$b" -v hz="$hz" -v r="${r:-0}" -v d="$DUR" \
    'BEGIN{ if (r > 0) printf "%s %.1f", r, (b-a)/hz*1e6/(r*d); else printf "0 0" }'
}

echo "== small keep-alive GETs ($CONNS connections, ${DUR}s each)" >&2
# Direct before and after the proxies, averaged: on a shared VM it drifts
# more between two runs than the proxies differ.
g_d1=$(rps direct); g_squid=$(rps 127.0.0.1:13128); g_tiny=$(rps 127.0.0.1:18888); g_us=$(rps 127.0.0.1:13129)
g_d2=$(rps direct); g_direct=$(( (${g_d1:-0} + ${g_d2:-0}) / 2 ))
echo "== CPU per forwarded GET (the lower of $ROUNDS rounds)" >&2
set -- $(best_cpu_gets rev 127.0.0.1:18081 "$rp_pid"); cpu_nginx=$2; cpu_nginx_rps=$1
set -- $(best_cpu_gets rev 127.0.0.1:18082 "$haproxy_pid"); cpu_haproxy=$2; cpu_haproxy_rps=$1
set -- $(best_cpu_gets abs 127.0.0.1:13128 "$squid_pid"); cpu_squid=$2; cpu_squid_rps=$1
set -- $(best_cpu_gets abs 127.0.0.1:18888 "$tinyproxy_pid"); cpu_tiny=$2; cpu_tiny_rps=$1
set -- $(best_cpu_gets abs 127.0.0.1:13129 "$portcullis_pid"); cpu_us=$2; cpu_us_rps=$1
set -- $(best_cpu_gets abs 127.0.0.1:13131 "$logged_pid"); cpu_logged=$2; cpu_logged_rps=$1
echo "== CPU per GB relayed (CONNECT, SOCKS5)" >&2
gb_squid=$(cpu_bulk connect 127.0.0.1:13128 "$squid_pid")
a=$(awk '{print $14+$15+$16+$17}' "/proc/$socat_pid/stat")
curl -s -o /dev/null "http://127.0.0.1:18091/big"; sleep 0.2
b=$(awk '{print $14+$15+$16+$17}' "/proc/$socat_pid/stat")
gb_socat=$(awk -v a="$a" -v b="$b" -v hz="$hz" -v mb="$BIG_MB" 'BEGIN{printf "%.0f", (b-a)/hz*1e3/(mb/1024)}')
gb_tiny=$(cpu_bulk connect 127.0.0.1:18888 "$tinyproxy_pid")
gb_us=$(cpu_bulk connect 127.0.0.1:13129 "$portcullis_pid")
gb_socks=$(cpu_bulk socks 127.0.0.1:11080 "$portcullis_pid")
echo "== small keep-alive GETs inside a CONNECT tunnel (a byte relay: the ceiling for any proxy)" >&2
c_direct=$(tunnels plain direct $ORIGIN "$CONNS" "$DUR")
c_squid=$(tunnels plain 127.0.0.1:13128 $ORIGIN "$CONNS" "$DUR" tunnel)
c_tiny=$(tunnels plain 127.0.0.1:18888 $ORIGIN "$CONNS" "$DUR" tunnel)
c_us=$(tunnels plain 127.0.0.1:13129 $ORIGIN "$CONNS" "$DUR" tunnel)
echo "== small keep-alive HTTPS GETs: direct TLS and through interception" >&2
m_direct=$(tunnels tls direct $ORIGIN_TLS "$CONNS" "$DUR" ca.pem 127.0.0.1)
set -- $(cpu_tunnels "$tlsrp_pid" tls direct 127.0.0.1:18444 "$CONNS" "$DUR" ca.pem 127.0.0.1); m_nginx=$1; cpu_m_nginx=$2
set -- $(cpu_tunnels "$mitm_pid" tls 127.0.0.1:13130 $ORIGIN_TLS "$CONNS" "$DUR" pca/ca.pem 127.0.0.1); m_us=$1; cpu_m_us=$2
echo "== small HTTPS GETs over 50 HTTP/2 streams on one connection: direct h2 and through interception" >&2
h2_direct=$(tunnels h2 direct $ORIGIN_TLS 50 "$DUR" ca.pem 127.0.0.1)
set -- $(cpu_tunnels "$tlsrp_pid" h2 direct 127.0.0.1:18444 50 "$DUR" ca.pem 127.0.0.1); h2_nginx=$1; cpu_h2_nginx=$2
set -- $(cpu_tunnels "$mitm_pid" h2 127.0.0.1:13130 $ORIGIN_TLS 50 "$DUR" pca/ca.pem 127.0.0.1); h2_us=$1; cpu_h2_us=$2
echo "== bulk ${BIG_MB} MiB" >&2
b_d1=$(bulk - direct); b_squid=$(bulk 127.0.0.1:13128 connect); b_tiny=$(bulk 127.0.0.1:18888 connect)
b_us=$(bulk 127.0.0.1:13129 connect); s_us=$(bulk 127.0.0.1:11080 socks)
b_d2=$(bulk - direct); b_direct=$(( (${b_d1:-0} + ${b_d2:-0}) / 2 ))
echo "== CONNECT handshakes ($HANDSHAKES, batches of 100)" >&2
# CPU µs per tunnel opened, from the same batches.
handshakes() { # ADDR PID -> "p50 p99 µs_per_tunnel"
  local a b out
  a=$(ticks "$2"); out=$(tunnels handshake "$1" $ORIGIN "$HANDSHAKES"); b=$(ticks "$2")
  echo "$out $(awk -v a="$a" -v b="$b" -v hz="$hz" -v n="$HANDSHAKES" 'BEGIN{printf "%.0f", (b-a)/hz*1e6/n}')"
}
set -- $(handshakes 127.0.0.1:13128 "$squid_pid"); h_squid="$1 $2"; t_squid=$3
set -- $(handshakes 127.0.0.1:18888 "$tinyproxy_pid"); h_tiny="$1 $2"; t_tiny=$3
set -- $(handshakes 127.0.0.1:13129 "$portcullis_pid"); h_us="$1 $2"; t_us=$3
echo "== $HOLD tunnels held" >&2
r_squid=$(tunnels hold 127.0.0.1:13128 $ORIGIN "$HOLD" "$squid_pid" || echo -)
r_tiny=$(tunnels hold 127.0.0.1:18888 $ORIGIN "$HOLD" "$tinyproxy_pid" || echo -)
r_us=$(tunnels hold 127.0.0.1:13129 $ORIGIN "$HOLD" "$portcullis_pid" || echo -)
echo "== $BURSTS bursts of $BURST active tunnels" >&2
a_us=$(tunnels bursts 127.0.0.1:13129 $ORIGIN "$BURST" "$BURSTS" "$portcullis_pid")
echo "== run -- true, run --isolate -- true" >&2
# Each timed the same way, two date(1) calls around it, beside /bin/true
# timed by the same loop: what the loop itself costs. `run -- true` alone
# first; then interleaved with `run --isolate -- true`, so drift on a
# shared machine falls on both alike (the isolated run sets up capture,
# routes, nftables, resolv.conf and the DNS server, each time, and the
# kernel tears its namespaces down after it returns, which the run after
# it pays for in part).
timed() { local a b; a=$(date +%s%N); "$@" >/dev/null; b=$(date +%s%N); echo $((b - a)); }
true_ns=0; plain_ns=0; after_ns=0; isolated_ns=0
for i in $(seq 50); do
  true_ns=$((true_ns + $(timed /bin/true)))
  plain_ns=$((plain_ns + $(timed "$PORTCULLIS" run -- true)))
done
for i in $(seq 50); do
  after_ns=$((after_ns + $(timed "$PORTCULLIS" run -- true)))
  isolated_ns=$((isolated_ns + $(timed "$PORTCULLIS" run --isolate -- true)))
done
ms() { awk -v n="$1" 'BEGIN{printf "%.1f", n/50/1e6}'; }
run_ms=$(ms "$plain_ns"); after_ms=$(ms "$after_ns"); isolate_ms=$(ms "$isolated_ns"); true_ms=$(ms "$true_ns")

echo
echo "portcullis load bench, $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -srm), $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ //')"
echo
echo "| path | direct | squid | tinyproxy | portcullis | portcullis / direct | portcullis / squid |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
echo "| small keep-alive GETs/s, $CONNS conns (direct: $g_d1 before, $g_d2 after) | $g_direct | $g_squid | $g_tiny | $g_us | $(ratio "$g_us" "$g_direct") | $(ratio "$g_us" "$g_squid") |"
echo "| the same GETs inside one CONNECT tunnel per connection (no per-request work: the relay ceiling) | $c_direct | $c_squid | $c_tiny | $c_us | $(ratio "$c_us" "$c_direct") | $(ratio "$c_us" "$c_squid") |"
echo "| small keep-alive HTTPS GETs/s, $CONNS conns: direct TLS vs intercepted (limited mode; nginx re-encrypting: $m_nginx, $(ratio "$m_us" "$m_nginx") of it) | $m_direct | – | – | $m_us | $(ratio "$m_us" "$m_direct") | – |"
echo "| small HTTPS GETs/s, 50 HTTP/2 streams on one connection: direct h2 vs intercepted (limited mode; nginx re-encrypting: $h2_nginx, $(ratio "$h2_us" "$h2_nginx") of it) | $h2_direct | – | – | $h2_us | $(ratio "$h2_us" "$h2_direct") | – |"
echo "| CONNECT bulk MB/s ($BIG_MB MiB; direct: $b_d1 before, $b_d2 after) | $b_direct | $b_squid | $b_tiny | $b_us | $(ratio "$b_us" "$b_direct") | $(ratio "$b_us" "$b_squid") |"
echo "| SOCKS5 bulk MB/s | $b_direct | – | – | $s_us | $(ratio "$s_us" "$b_direct") | – |"
echo "| CONNECT handshake p50 / p99 ms | – | ${h_squid/ / \/ } | ${h_tiny/ / \/ } | ${h_us/ / \/ } | – | – |"
echo "| RSS KiB per held tunnel ($HOLD held, each used once) | – | $r_squid | $r_tiny | $r_us | – | – |"
echo "| RSS MiB after $BURSTS bursts of $BURST active tunnels | – | – | – | $a_us | – | – |"
echo "| \`run -- true\` ms (\`/bin/true\` timed the same way: $true_ms ms; between isolated runs: $after_ms ms) | – | – | – | $run_ms | – | – |"
echo "| \`run --isolate -- true\` ms (capture set up each time) | – | – | – | $isolate_ms | – | – |"
echo
echo "Each process's own CPU (user + system), the lower of $ROUNDS rounds:"
echo
echo "| proxy | GETs/s | CPU µs per GET | portcullis / this | CPU ms per GB (CONNECT) | CPU µs per tunnel opened |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| nginx, reverse proxy, upstream keepalive, 1 worker | $cpu_nginx_rps | $cpu_nginx | $(ratio "$cpu_us" "$cpu_nginx") | – | – |"
echo "| haproxy, reverse proxy, http-reuse always, 1 thread | $cpu_haproxy_rps | $cpu_haproxy | $(ratio "$cpu_us" "$cpu_haproxy") | – | – |"
echo "| socat, a plain TCP relay (the per-GB reference) | – | – | $(ratio "$gb_us" "$gb_socat") per GB | $gb_socat | – |"
echo "| squid | $cpu_squid_rps | $cpu_squid | $(ratio "$cpu_us" "$cpu_squid") | $gb_squid | $t_squid |"
echo "| tinyproxy | $cpu_tiny_rps | $cpu_tiny | $(ratio "$cpu_us" "$cpu_tiny") | $gb_tiny | $t_tiny |"
echo "| portcullis, absolute-form, policy on, access log off | $cpu_us_rps | $cpu_us | 1.00× | $gb_us (SOCKS5: $gb_socks) | $t_us |"
echo "| portcullis, access log on | $cpu_logged_rps | $cpu_logged | $(ratio "$cpu_logged" "$cpu_us") of the row above | – | – |"
echo
echo "Interception against nginx doing the same work (TLS terminated, re-encrypted to the TLS origin over kept connections, sessions resumed, one worker), CPU per request:"
echo
echo "| HTTPS GETs | nginx GETs/s | nginx CPU µs | portcullis GETs/s | portcullis CPU µs | portcullis / nginx |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| HTTP/1.1, $CONNS keep-alive connections | $m_nginx | $cpu_m_nginx | $m_us | $cpu_m_us | $(ratio "$cpu_m_us" "$cpu_m_nginx") |"
echo "| HTTP/2, 50 streams on one connection | $h2_nginx | $cpu_h2_nginx | $h2_us | $cpu_h2_us | $(ratio "$cpu_h2_us" "$cpu_h2_nginx") |"
