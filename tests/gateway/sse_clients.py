"""A load client for the event-stream tests: one process holding N SSE streams open.

    python sse_clients.py URL COOKIE N FIRST

opens N streams (GET URL with COOKIE, raw asyncio sockets, BATCH at a time), waits on
each until the bytes FIRST arrived, prints `open N`, then answers commands on stdin,
one a line:
- `count`: prints how many streams are still open (the server has not ended their
  response nor closed their connection);
- `wait NEEDLE`: waits until NEEDLE arrived on every stream and prints a JSON list of
  the `time.monotonic()` of the read that brought it on each (the clock is the
  machine's, so the test process can compare it with its own);
- `quit`: closes every stream and exits.
It runs in a process of its own so that its work does not share the gateway's event loop.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from urllib.parse import urlsplit

BATCH = 100


class RawStream:
    """One stream; once open, a task keeps reading it into `buf` until the server ends it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = b""
        self.reads: list[tuple[int, float]] = []  # (len(buf) after a read, when)
        self.ended = False
        self.grew = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None

    async def read(self) -> None:
        chunk = await self.reader.read(65536)
        self.buf += chunk
        self.reads.append((len(self.buf), time.monotonic()))
        # The server closed, or ended the response (the last chunk of a chunked body).
        if not chunk or self.buf.endswith(b"\r\n0\r\n\r\n"):
            self.ended = True
        self.grew.set()

    async def run(self) -> None:
        while not self.ended:
            await self.read()

    async def until(self, needle: bytes) -> float:
        while needle not in self.buf:
            if self.ended:
                raise SystemExit(f"stream ended before {needle!r}: {self.buf[-300:]!r}")
            if self.pump is None:
                await self.read()
            else:
                self.grew.clear()
                await self.grew.wait()
        end = self.buf.index(needle) + len(needle)
        return next(t for n, t in self.reads if n >= end)  # the read that brought it


async def open_stream(url: str, cookie: str, first: bytes) -> RawStream:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nCookie: {cookie}\r\n"
                  "Accept: text/event-stream\r\n\r\n").encode())
    stream = RawStream(reader, writer)
    await stream.until(first)
    if not stream.buf.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"refused: {stream.buf[:300]!r}")
    return stream


async def main(url: str, cookie: str, n: int, first: bytes) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * n + 100), hard))
    streams: list[RawStream] = []
    for i in range(0, n, BATCH):
        streams += await asyncio.gather(*(open_stream(url, cookie, first)
                                          for _ in range(min(BATCH, n - i))))
    for s in streams:
        s.pump = asyncio.create_task(s.run())
    print(f"open {len(streams)}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "count":
            print(sum(not s.ended for s in streams), flush=True)
        elif line.startswith("wait "):
            needle = line[5:].encode()
            times = await asyncio.gather(*(s.until(needle) for s in streams))
            print(json.dumps(times), flush=True)
        else:
            break
    for s in streams:
        s.writer.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].encode()))
