#!/usr/bin/env bash
# What secret scanning costs end to end, on loopback, in one run: portcullis
# with [scan] action = "off" and "deny", each serving
#   - one 100 MiB upload (throughput, MiB/s), with max_body raised to hold it
#     (a body is read whole before it is judged: that is the bound's price);
#   - UPLOADS (1,000) concurrent uploads of SIZE (64 KiB) each, held open
#     until all are in flight: the proxy's peak RSS (VmHWM) beside its RSS
#     at rest, and the increase per upload.
# From the repository:
#
#     bash benches/load/inspection.sh [BIN]
#
# Needs python3 (the origin and the clients). Loops are bounded in count and
# time; everything started is stopped on exit.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
UPLOADS=${UPLOADS:-1000}; SIZE=${SIZE:-65536}; BIG_MB=${BIG_MB:-100}
BIN=${1:-}
if [ -z "$BIN" ]; then (cd "$repo" && cargo build --release --quiet); BIN="$repo/target/release/portcullis"; fi
W=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cat > "$W/origin.py" <<'PY'
# Reads each request body whole and answers 200: the uploads' destination.
import asyncio, sys
async def serve(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while length:
                chunk = await reader.read(min(length, 1 << 20)); length -= len(chunk)
                if not chunk: return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"); await writer.drain()
    except Exception:
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
PY

cat > "$W/clients.py" <<'PY'
# big PROXY ORIGIN MB | many PROXY ORIGIN N SIZE PID
import asyncio, sys, time
mode, proxy, origin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def head(length):
    return (f"POST http://127.0.0.1:{origin}/up HTTP/1.1\r\nHost: 127.0.0.1:{origin}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode()
def rss(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field): return int(line.split()[1])
async def answer(reader):
    line = await asyncio.wait_for(reader.readline(), 120)
    return line.split()[1].decode() if line else "closed"
async def big(mb):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
    chunk = (b"git status: nothing to commit, working tree clean\n" * 21000)[:1 << 20]
    start = time.monotonic()
    writer.write(head(mb << 20))
    for _ in range(mb):
        writer.write(chunk); await writer.drain()
    status = await answer(reader)
    print(f"{mb} MiB upload: {status}, {mb / (time.monotonic() - start):.0f} MiB/s")
async def many(n, size, pid):
    rest = rss(pid, "VmRSS")
    body = (b"0123456789abcdef" * (size // 16 + 1))[:size]
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy)
        # All but the last byte: the proxy holds each body, unjudged.
        writer.write(head(size) + body[:-1]); conns.append((reader, writer))
    await asyncio.gather(*(w.drain() for _, w in conns))
    await asyncio.sleep(2)
    held = rss(pid, "VmRSS")
    for _, writer in conns:
        writer.write(body[-1:])
    statuses = await asyncio.gather(*(answer(r) for r, _ in conns))
    peak = rss(pid, "VmHWM")
    ok = sum(s == "200" for s in statuses)
    print(f"{n} uploads of {size} B held: RSS {rest} KiB at rest, {held} KiB held, peak {peak} KiB,"
          f" {(held - rest) / n:.1f} KiB per upload; {ok}/{n} answered 200")
    for _, writer in conns: writer.close()
if mode == "big": asyncio.run(big(int(sys.argv[4])))
else: asyncio.run(many(int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])))
PY

python3 "$W/origin.py" > "$W/origin.port" & pids+=($!)
for _ in $(seq 100); do [ -s "$W/origin.port" ] && break; sleep 0.1; done
origin=$(cat "$W/origin.port")

port=28499
for action in off deny; do
  for max in $(( (BIG_MB + 1) << 20 )) 0; do
    printf '[network]\nallowed_domains = ["127.0.0.1"]\nenable_socks5 = false\n\n[scan]\naction = "%s"\nmax_body = %d\n' "$action" "$max" > "$W/c.toml"
    port=$((port + 1))
    PORTCULLIS_LOG=warn "$BIN" serve --http "127.0.0.1:$port" --config "$W/c.toml" >"$W/proxy.out" 2>"$W/proxy.err" & pid=$!; pids+=($pid)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    if [ "$max" != 0 ]; then
      printf '[scan] %-4s (max_body %d MiB): ' "$action" $((max >> 20))
      timeout 300 python3 "$W/clients.py" big "$port" "$origin" "$BIG_MB"
    else
      printf '[scan] %-4s (max_body 1 MiB): ' "$action"
      timeout 300 python3 "$W/clients.py" many "$port" "$origin" "$UPLOADS" "$SIZE" "$pid"
    fi
    kill "$pid"; wait "$pid" 2>/dev/null || true
  done
done
