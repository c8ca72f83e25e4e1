#!/usr/bin/env python3
"""Opens N streaming chat requests to the gateway and holds them open, then
prints one JSON line: how many streams got their first chunk, the median and
p99 time to first chunk, and the gateway's RSS (from /proc) while all are
open. Used by scripts/bench.sh; loopback only, bounded, stops by itself.

usage: open_streams.py PORT KEY N GATEWAY_PID
"""

import asyncio
import json
import sys
import time


async def stream(port, key, started, results, hold):
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": 1000,
                       "messages": [{"role": "user", "content": "hold"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.monotonic()
        writer.write(head + body)
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            if line.startswith(b"data:"):
                results.append(time.monotonic() - t0)
                break
        await hold.wait()
        writer.close()
    except OSError:
        return


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def main():
    port, key, n, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    before = rss_kib(pid)
    results, hold = [], asyncio.Event()
    started = time.monotonic()
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(stream(port, key, started, results, hold)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    deadline = time.monotonic() + 60
    while len(results) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    during = rss_kib(pid)
    hold.set()
    _, pending = await asyncio.wait(tasks, timeout=10)
    for task in pending:
        task.cancel()
    ttft = sorted(results)
    pick = lambda q: round(ttft[min(len(ttft) - 1, int(q * len(ttft)))] * 1000, 2) if ttft else None
    print(json.dumps({"streams": len(results), "ttft_p50_ms": pick(0.5), "ttft_p99_ms": pick(0.99),
                      "rss_before_kib": before, "rss_open_kib": during,
                      "kib_per_stream": round((during - before) / max(len(results), 1), 2)}))


asyncio.run(main())
