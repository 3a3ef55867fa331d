"""An archive's bytes as streams: gzip framing, checksums, the hold-back and progress.

Pure byte code: no Docker, no network, no file. Everything works on async iterators of
bytes, so it is tested without any service (tests/test_storage_codec.py); the adapters
(codehub.backends.docker.volumes and its restore transports) only move these bytes.

Guarantees:
- `gzip_tar(blocks, ...)` yields one gzip member (plain `gzip -d` reads it) of exactly the
  bytes of `blocks`, and `tally` ends up holding the size and sha256 of what it yielded.
  Compressing block N (in a worker thread) overlaps with reading block N+1 and with the
  consumer taking block N-1. Unless the input ended with the tar's end-of-archive marker
  (two zero blocks) it raises TruncatedTar before the gzip trailer, so a consumer that
  uploads the stream aborts instead of storing it.
- `VerifiedTar(source, expected, sanitiser, ...).pieces()` yields the plain tar of the
  gzipped `source`, passed through `sanitiser` (codehub.storage.tarfilter). The last
  HOLD_BACK bytes (the end-of-archive blocks among them) are yielded only after the whole
  source was read and its size, sha256 and gzip trailer matched `expected`: a consumer
  never receives a complete tar that did not verify.
- Its one error path: a failure (IntegrityError for a mismatch, garbage or a truncated
  gzip; the filter's MalformedArchive or HomeTooLarge; whatever the source raised) is
  raised by `pieces()` to its consumer, overtaking pieces still queued, and stays readable
  as `failure()`; `check()` raises it, or AdapterError when the consumer stopped before
  the verified end. Leaving `pieces()` early cancels the reading and closes `source`.
- Progress goes to the callback as it happens, unthrottled ("reading" per block;
  "downloading" per chunk read, then "extracting" once, at the verified end): the one
  throttle is the reconciler's, which writes progress to the database.
- Memory is bounded: one block read ahead and one being compressed (gzip_tar); one
  compressed chunk, at most `ahead` + 1 inflated pieces of at most `chunk_size` bytes and
  HOLD_BACK bytes held back (VerifiedTar).

Compression and inflation use isal (igzip: the same format, several times faster than
zlib) for levels 0-3 when it is importable, zlib otherwise (and for levels 4-9).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..failpoints import failpoint
from ..interfaces import AdapterError, IntegrityError, Progress, ProgressCallback
from .tarfilter import TarFilter

log = logging.getLogger(__name__)

isal_zlib: Any
try:
    from isal import isal_zlib
except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
    isal_zlib = None

HOLD_BACK = 64 * 1024
RESTORE_AHEAD = 8  # inflated pieces (each at most chunk_size) queued ahead of the consumer
END_OF_TAR = bytes(1024)  # two zero blocks
_INFLATE_ERRORS: tuple[type[Exception], ...] = (zlib.error,) + (
    (isal_zlib.error,) if isal_zlib is not None else ())


class TruncatedTar(AdapterError):
    """A tar stream ended without its end-of-archive marker."""


async def report(callback: ProgressCallback | None, phase: str, done: int,
                 total: int | None) -> None:
    """Hand one Progress to `callback` (plain or async); no callback, nothing to do."""
    if callback is not None:
        result = callback(Progress(phase, done, total))
        if inspect.isawaitable(result):
            await result


def compressor(level: int) -> Any:
    """A gzip-framing (wbits 31) compressobj: isal for levels 0-3, zlib otherwise."""
    if isal_zlib is not None and 0 <= level <= 3:
        return isal_zlib.compressobj(level, isal_zlib.DEFLATED, 31)
    return zlib.compressobj(level, zlib.DEFLATED, 31)


@dataclass(slots=True)
class Tally:
    """Size and sha256 of the compressed bytes produced. Only ever used by one thread at
    a time: each block is compressed after the previous one finished."""

    sha256: Any = field(default_factory=hashlib.sha256)
    size: int = 0

    def compress(self, comp: Any, block: bytes) -> bytes:
        return self._count(comp.compress(block))

    def flush(self, comp: Any) -> bytes:
        return self._count(comp.flush())

    def _count(self, out: bytes) -> bytes:
        self.sha256.update(out)
        self.size += len(out)
        return out


async def gzip_tar(blocks: AsyncIterator[bytes], *, level: int, tally: Tally,
                   progress: ProgressCallback | None = None) -> AsyncGenerator[bytes, None]:
    """`blocks` (a tar stream) as one gzip member; see the module's guarantees."""
    loop = asyncio.get_running_loop()
    comp = compressor(level)
    read = 0
    tail = b""
    pending: asyncio.Future[bytes] | None = None
    while True:
        block = await anext(blocks, b"")
        out = b"" if pending is None else await pending
        pending = None
        if block:
            read += len(block)
            tail = (tail + block[-len(END_OF_TAR):])[-len(END_OF_TAR):]
            pending = loop.run_in_executor(None, tally.compress, comp, block)
        if out:
            yield out
        if not block:
            break
        await report(progress, "reading", read, None)
    if tail != END_OF_TAR:
        raise TruncatedTar(f"the tar stream ended without its end-of-archive marker after "
                           f"{read} bytes")
    last = await loop.run_in_executor(None, tally.flush, comp)
    if last:
        yield last


class Inflater:
    """Hashes the compressed stream and inflates it with bounded output per call. Only ever
    used by one thread at a time (each call is awaited before the next is made)."""

    def __init__(self, limit: int, what: str) -> None:
        self.sha256 = hashlib.sha256()
        self._what = what
        self._d = (isal_zlib or zlib).decompressobj(31)
        self._limit = limit

    @property
    def pending(self) -> bool:
        """Input is left that did not fit under the output limit: call `more()`."""
        return bool(self._d.unconsumed_tail)

    def first(self, chunk: bytes) -> bytes:
        self.sha256.update(chunk)
        return self._inflate(chunk)

    def more(self) -> bytes:
        return self._inflate(self._d.unconsumed_tail)

    def _inflate(self, data: bytes) -> bytes:
        try:
            out: bytes = self._d.decompress(data, self._limit)
        except _INFLATE_ERRORS as exc:
            raise IntegrityError(f"{self._what} is not valid gzip: {exc}") from exc
        return out

    def finish(self) -> bytes:
        """The last output; IntegrityError unless exactly one complete gzip member came."""
        try:
            out: bytes = self._d.flush()
        except _INFLATE_ERRORS as exc:
            raise IntegrityError(f"{self._what} is not valid gzip: {exc}") from exc
        if not self._d.eof:
            raise IntegrityError(f"{self._what} ends before its gzip trailer")
        if self._d.unused_data:
            raise IntegrityError(f"{self._what} has data after its gzip member")
        return out


class HoldBack:
    """Passes bytes on in order, always keeping the last `size` of them until `release()`."""

    def __init__(self, size: int = HOLD_BACK) -> None:
        self._size = size
        self._held = b""

    def push(self, data: bytes) -> list[bytes | memoryview]:
        """What may be passed on now that `data` came (possibly nothing)."""
        size = self._size
        if len(data) > size:  # send the old tail and all but a new one
            out: list[bytes | memoryview] = [self._held] if self._held else []
            out.append(memoryview(data)[:-size])
            self._held = data[-size:]
            return out
        self._held += data
        if len(self._held) <= size:
            return []
        out = [self._held[:-size]]
        self._held = self._held[-size:]
        return out

    def release(self, last: bytes = b"") -> bytes:
        """Everything held back, then `last`: for once the stream is known to be good."""
        held, self._held = self._held + last, b""
        return held


@dataclass(frozen=True, slots=True)
class Expected:
    """What an archive must be: `size` bytes whose sha256 is `sha256`."""

    key: str
    size: int
    sha256: str

    def __str__(self) -> str:
        return f"archive {self.key} (expected sha256 {self.sha256})"

    def verify(self, received: int, digest: str) -> None:
        if received != self.size or digest != self.sha256:
            raise IntegrityError(
                f"archive {self.key} does not verify: read {received} bytes with sha256 "
                f"{digest}, expected {self.size} bytes with sha256 {self.sha256}")


def _filtered(sanitiser: TarFilter, inflate: Callable[..., bytes], *args: bytes) -> bytes:
    """Inflate, then filter (one worker-thread call, so the loop does neither)."""
    return sanitiser.feed(inflate(*args))


Piece = bytes | memoryview


class VerifiedTar:
    """The verified, filtered tar of one archive; see the module's guarantees."""

    def __init__(self, source: AsyncIterator[bytes], expected: Expected,
                 sanitiser: TarFilter, *, chunk_size: int,
                 progress: ProgressCallback | None = None, ahead: int = RESTORE_AHEAD
                 ) -> None:
        self.expected = expected
        self._source = source
        self._sanitiser = sanitiser
        self._chunk_size = chunk_size
        self._progress = progress
        self._queue: asyncio.Queue[Piece | None] = asyncio.Queue(ahead)
        self._producer: asyncio.Task[None] | None = None
        self.received = 0

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """The tar, read, hashed and inflated up to `ahead` pieces ahead by a task of its
        own (while the consumer writes files, the next pieces are inflated in a worker
        thread). Raises the stream's failure; once only."""
        assert self._producer is None, "a VerifiedTar is read once"
        self._producer = asyncio.create_task(self._produce())
        first = True
        try:
            while (piece := await self._queue.get()) is not None:
                yield piece
                if first:
                    first = False
                    failpoint("restore.after_download_start")
            await self._producer  # raises the failure that ended the stream, if one did
        finally:
            if not self._producer.done():
                self._producer.cancel()
            await asyncio.wait([self._producer])
            self.failure()  # retrieved: raised above, superseded, or read by the caller

    def failure(self) -> BaseException | None:
        """What ended the stream before its verified end, if anything did (not a cancel)."""
        task = self._producer
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    def check(self, incomplete: str) -> None:
        """Raise the stream's failure, or AdapterError(`incomplete`) unless it was read to
        its verified end."""
        if (failure := self.failure()) is not None:
            raise failure
        task = self._producer
        if task is None or not task.done() or task.cancelled():
            raise AdapterError(incomplete)

    async def _produce(self) -> None:
        try:
            await self._inflate_all()
        except Exception:
            while not self._queue.empty():  # the failure overtakes what is still queued
                self._queue.get_nowait()
            self._queue.put_nowait(None)  # wakes the consumer, which raises the failure
            raise
        finally:
            aclose = getattr(self._source, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _inflate_all(self) -> None:
        expected, sanitiser = self.expected, self._sanitiser
        inflater = Inflater(self._chunk_size, str(expected))
        hold = HoldBack()
        async for chunk in self._source:
            self.received += len(chunk)
            out = await asyncio.to_thread(_filtered, sanitiser, inflater.first, chunk)
            while True:
                for piece in hold.push(out):
                    await self._queue.put(piece)
                if not inflater.pending:
                    break
                out = await asyncio.to_thread(_filtered, sanitiser, inflater.more)
            await report(self._progress, "downloading", self.received, expected.size)
        last = await asyncio.to_thread(_filtered, sanitiser, inflater.finish)
        expected.verify(self.received, inflater.sha256.hexdigest())
        held = hold.release(last + sanitiser.finish())  # the end-of-archive marker, only now
        if sanitiser.dropped:
            log.warning("restore of %s left out %d entries (%s)", expected.key,
                        len(sanitiser.dropped), "; ".join(
                            f"{name}: {why}" for name, why in sanitiser.dropped[:20]))
        if held:
            await self._queue.put(held)
        await report(self._progress, "extracting", self.received, expected.size)
        await self._queue.put(None)
