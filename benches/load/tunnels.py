#!/usr/bin/env python3
"""Tunnel figures for one proxy, for benches/load/run.sh.

  tunnels.py handshake PROXY ORIGIN COUNT   CONNECT handshake latency: p50 and p99 ms
  tunnels.py hold PROXY ORIGIN COUNT PID    RSS of PID per held, once-used tunnel (KiB)
  tunnels.py bursts PROXY ORIGIN COUNT N PID
                                            RSS of PID after N bursts of COUNT active tunnels

PROXY and ORIGIN are host:port; tunnels are CONNECTs to ORIGIN (an HTTP
server) carrying one small GET each. Loopback only; every loop is bounded.
"""
import asyncio
import resource
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def open_tunnel(proxy, origin, use=True):
    host, port = proxy.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
        raise RuntimeError(head[:60])
    if use:
        writer.write(f"GET / HTTP/1.1\r\nHost: {origin}\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        await reader.read(64)
    return reader, writer


async def bounded(count, make, parallel=200):
    gate = asyncio.Semaphore(parallel)

    async def one():
        async with gate:
            return await make()

    return await asyncio.gather(*(one() for _ in range(count)))


async def handshake(proxy, origin, count):
    async def timed():
        started = time.perf_counter()
        _, writer = await open_tunnel(proxy, origin, use=False)
        elapsed = (time.perf_counter() - started) * 1000
        writer.close()
        return elapsed

    times = []
    for _ in range(count // 100):  # batches of 100, as the issue measured
        times += await bounded(100, timed, parallel=100)
    times.sort()
    p50 = times[len(times) // 2]
    p99 = times[int(len(times) * 0.99) - 1]
    print(f"{p50:.2f} {p99:.2f}")


async def hold(proxy, origin, count, pid):
    before = rss_kib(pid)
    held = await bounded(count, lambda: open_tunnel(proxy, origin))
    await asyncio.sleep(0.5)
    during = rss_kib(pid)
    for _, writer in held:
        writer.close()
    print(f"{(during - before) / count:.1f}")


async def bursts(proxy, origin, count, rounds, pid):
    for _ in range(rounds):
        held = await bounded(count, lambda: open_tunnel(proxy, origin))
        for _, writer in held:
            writer.close()
        await asyncio.sleep(1.0)
    print(f"{rss_kib(pid) / 1024:.1f}")


def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    what, proxy, origin, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if what == "handshake":
        asyncio.run(handshake(proxy, origin, count))
    elif what == "hold":
        asyncio.run(hold(proxy, origin, count, int(sys.argv[5])))
    elif what == "bursts":
        asyncio.run(bursts(proxy, origin, count, int(sys.argv[5]), int(sys.argv[6])))
    else:
        sys.exit(f"unknown measure {what}")


if __name__ == "__main__":
    main()
