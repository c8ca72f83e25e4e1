#!/usr/bin/env python3
"""Chunk forwarding delay: opens N concurrent streams to PORT (runestone-mock
started with --stamp-chunks, directly or through a gateway) and, for every
chunk, takes the time it arrived minus the time the mock wrote it (both
CLOCK_MONOTONIC on this machine). Prints one JSON line with p50, p99 and
p99.9 in microseconds. Used by scripts/bench.sh; loopback only, bounded.

usage: chunk_delay.py PORT KEY STREAMS TOKENS
"""

import asyncio
import json
import sys
import time


def now_us():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


async def stream(port, key, tokens, delays):
    body = json.dumps({"model": "gpt-4o-mini", "stream": True, "max_tokens": tokens,
                       "messages": [{"role": "user", "content": "stamp"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    while True:
        line = await reader.readline()
        if not line:
            break
        arrived = now_us()
        if not line.startswith(b"data: {"):
            continue
        choices = json.loads(line[6:]).get("choices") or []
        content = (choices[0].get("delta") or {}).get("content") if choices else None
        if content and content.isdigit():
            delays.append(arrived - int(content))
    writer.close()


async def main():
    port, key, streams, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    delays = []
    await asyncio.wait_for(
        asyncio.gather(*(stream(port, key, tokens, delays) for _ in range(streams))), 120)
    delays.sort()

    def pct(p):
        return delays[min(len(delays) - 1, int(len(delays) * p))] if delays else None

    print(json.dumps({"chunks": len(delays), "p50_us": pct(0.5), "p99_us": pct(0.99),
                      "p999_us": pct(0.999)}))


asyncio.run(main())
