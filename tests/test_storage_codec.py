"""codehub/storage/codec.py without Docker, a network or a store: the archive's bytes as
streams, each test named after a guarantee of the module. Tars are written by Python's
tarfile, gzip is read back by Python's gzip module; the source of a restore is an async
generator over bytes in memory."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import AsyncIterator

import pytest
from storage_support import end_of_members

from codehub.interfaces import AdapterError, IntegrityError, Progress
from codehub.storage.codec import (
    HOLD_BACK,
    Expected,
    HoldBack,
    Tally,
    TruncatedTar,
    VerifiedTar,
    gzip_tar,
)
from codehub.storage.tarfilter import HomeTooLarge, MalformedArchive, TarFilter

KiB = 1024
CHUNK = 64 * KiB


def home_tar(*files: tuple[str, bytes]) -> bytes:
    """A home as the restore hands it on: `coder/` and its files, owner 1000."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        top = tarfile.TarInfo("coder")
        top.type, top.mode, top.uid, top.gid = tarfile.DIRTYPE, 0o755, 1000, 1000
        tf.addfile(top)
        for name, data in files:
            info = tarfile.TarInfo(f"coder/{name}")
            info.size, info.mode, info.uid, info.gid = len(data), 0o644, 1000, 1000
            info.mtime = 1_700_000_000
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def as_filtered(tar: bytes) -> bytes:
    """`tar` as the filter emits it: its members, then exactly two zero blocks."""
    return tar[:end_of_members(tar)] + bytes(1024)


def random_home(size: int) -> bytes:
    """Incompressible and compressible files adding up to about `size` bytes."""
    return home_tar(("random.bin", os.urandom(size // 2)), ("text.txt", b"home " * (size // 10)))


async def pieces_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at:at + size]


class Store:
    """An archive streamed as a store does, in CHUNK pieces; it records how much was read
    and whether the stream was closed, and fails after `fail_after` pieces when told."""

    def __init__(self, archive: bytes, fail_after: int | None = None) -> None:
        self.archive = archive
        self.fail_after = fail_after
        self.read = 0
        self.closed = False

    async def stream(self) -> AsyncIterator[bytes]:
        try:
            async for piece in pieces_of(self.archive, CHUNK):
                if self.fail_after is not None and self.read >= self.fail_after * CHUNK:
                    raise AdapterError("the store went away")
                self.read += len(piece)
                yield piece
        finally:
            self.closed = True


async def gzipped(tar: bytes, block: int = CHUNK, level: int = 1) -> tuple[bytes, Tally]:
    tally = Tally()
    out = b"".join([c async for c in gzip_tar(pieces_of(tar, block), level=level,
                                               tally=tally)])
    return out, tally


def sanitiser(limit: int | None = None) -> TarFilter:
    return TarFilter(uid=1000, gid=1000, top=b"coder", size_limit=limit)


def expected_of(archive: bytes) -> Expected:
    return Expected("w1/home.tar.gz", len(archive), hashlib.sha256(archive).hexdigest())


async def read_all(tar: VerifiedTar) -> bytes:
    return b"".join([bytes(p) async for p in tar.pieces()])


def verified(archive: bytes, expected: Expected | None = None, *, chunk: int = CHUNK,
             limit: int | None = None, progress: list[Progress] | None = None
             ) -> VerifiedTar:
    return VerifiedTar(pieces_of(archive, chunk), expected or expected_of(archive),
                       sanitiser(limit), chunk_size=CHUNK,
                       progress=None if progress is None else progress.append)


# --- gzip_tar -------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 1, 6])
async def test_gzip_tar_yields_one_gzip_member_of_exactly_its_input(level: int) -> None:
    tar = random_home(600 * KiB)
    archive, _ = await gzipped(tar, level=level)
    assert gzip.decompress(archive) == tar
    with gzip.GzipFile(fileobj=io.BytesIO(archive)) as one:  # one member: nothing after it
        assert one.read() == tar


async def test_gzip_tar_tally_holds_the_size_and_sha256_of_what_it_yielded() -> None:
    archive, tally = await gzipped(random_home(300 * KiB))
    assert tally.size == len(archive)
    assert tally.sha256.hexdigest() == hashlib.sha256(archive).hexdigest()


async def test_gzip_tar_without_the_end_of_archive_marker_raises_before_the_trailer() -> None:
    tar = random_home(200 * KiB)
    cut = tar[:end_of_members(tar)]  # the members, without the zero blocks after them
    out = bytearray()
    with pytest.raises(TruncatedTar, match="end-of-archive"):
        async for chunk in gzip_tar(pieces_of(cut, CHUNK), level=1, tally=Tally()):
            out += chunk
    inflater = zlib.decompressobj(31)
    inflater.decompress(bytes(out))
    assert not inflater.eof  # what was yielded is no complete gzip member
    assert isinstance(TruncatedTar("x"), AdapterError)


async def test_gzip_tar_reports_reading_progress_per_block() -> None:
    tar = random_home(300 * KiB)
    seen: list[Progress] = []
    async for _ in gzip_tar(pieces_of(tar, CHUNK), level=1, tally=Tally(),
                            progress=seen.append):
        pass
    assert [p.done for p in seen] == [min(n * CHUNK, len(tar))
                                      for n in range(1, -(-len(tar) // CHUNK) + 1)]
    assert {p.phase for p in seen} == {"reading"} and all(p.total is None for p in seen)


# --- VerifiedTar ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1000, CHUNK, 1 << 20])
async def test_a_round_trip_gives_back_the_tar(chunk: int) -> None:
    tar = random_home(900 * KiB)
    archive, _ = await gzipped(tar)
    tar_back = await read_all(verified(archive, chunk=chunk))
    assert tar_back == as_filtered(tar)


async def test_a_checksum_mismatch_is_an_integrity_error_naming_both_sums() -> None:
    archive, _ = await gzipped(random_home(200 * KiB))
    wrong = Expected("w1/home.tar.gz", len(archive), "0" * 64)
    tar = verified(archive, wrong)
    with pytest.raises(IntegrityError) as caught:
        await read_all(tar)
    assert "0" * 64 in str(caught.value)
    assert hashlib.sha256(archive).hexdigest() in str(caught.value)
    assert tar.failure() is caught.value
    with pytest.raises(IntegrityError):
        tar.check("unused")


async def test_a_size_mismatch_is_an_integrity_error() -> None:
    archive, _ = await gzipped(random_home(100 * KiB))
    right = expected_of(archive)
    with pytest.raises(IntegrityError, match="does not verify"):
        await read_all(verified(archive, Expected(right.key, right.size + 1, right.sha256)))


async def test_the_last_64_kib_wait_until_the_archive_verified() -> None:
    """The archive is corrupt only in its gzip trailer: every byte of the tar inflates
    right, and still the consumer never gets the tar's last HOLD_BACK bytes."""
    plain = random_home(800 * KiB)
    archive, _ = await gzipped(plain)
    tar = as_filtered(plain)
    bad = archive[:-8] + bytes(b ^ 0xFF for b in archive[-8:])
    got = bytearray()
    with pytest.raises(IntegrityError):
        async for piece in verified(bad, expected_of(archive)).pieces():
            got += piece
    assert len(got) > len(tar) // 2, "the consumer saw no stream to speak of"
    assert bytes(got) == tar[:len(got)]
    assert len(got) <= len(tar) - HOLD_BACK


async def test_the_end_of_the_tar_comes_only_after_the_source_was_read_to_its_end() -> None:
    plain = random_home(400 * KiB)
    archive, _ = await gzipped(plain)
    tar = as_filtered(plain)
    store = Store(archive)
    stream = VerifiedTar(store.stream(), expected_of(archive), sanitiser(), chunk_size=CHUNK)
    got = bytearray()
    async for piece in stream.pieces():
        if len(got) + len(piece) > len(tar) - HOLD_BACK:
            assert store.read == len(archive)
        got += piece
    assert bytes(got) == tar
    stream.check("unused")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "data-after", "empty"])
async def test_truncated_or_garbage_input_is_an_integrity_error(damage: str) -> None:
    archive, _ = await gzipped(random_home(200 * KiB))
    bad = {"truncated": archive[:len(archive) // 2], "garbage": os.urandom(len(archive)),
           "data-after": archive + b"more", "empty": b""}[damage]
    with pytest.raises(IntegrityError):
        await read_all(verified(bad))


async def test_a_gzip_of_no_tar_fails_in_the_filter() -> None:
    archive = gzip.compress(os.urandom(10 * KiB))
    with pytest.raises(MalformedArchive):
        await read_all(verified(archive))


async def test_a_home_over_the_size_limit_fails_before_the_extractor_gets_it_all() -> None:
    archive, _ = await gzipped(home_tar(("a.bin", bytes(300 * KiB)), ("b.bin", bytes(300 * KiB))))
    with pytest.raises(HomeTooLarge):
        await read_all(verified(archive, limit=400 * KiB))


async def test_the_sources_failure_reaches_the_consumer_and_the_source_is_closed() -> None:
    archive, _ = await gzipped(random_home(400 * KiB))
    store = Store(archive, fail_after=1)
    tar = VerifiedTar(store.stream(), expected_of(archive), sanitiser(), chunk_size=CHUNK)
    with pytest.raises(AdapterError, match="went away"):
        await read_all(tar)
    assert store.closed
    assert str(tar.failure()) == "the store went away"


async def test_a_failure_overtakes_the_pieces_still_queued() -> None:
    """The producer fails with many pieces queued and not taken: the consumer's next piece
    is the error, not what was queued before it."""
    archive, _ = await gzipped(random_home(2 << 20))
    bad = archive[:-8] + bytes(8)
    tar = VerifiedTar(pieces_of(bad, CHUNK), expected_of(archive), sanitiser(),
                      chunk_size=16 * KiB, ahead=10_000)
    pieces = tar.pieces()
    await anext(pieces)
    while tar.failure() is None:  # the producer runs on to the bad trailer meanwhile
        await asyncio.sleep(0.001)
    with pytest.raises(IntegrityError):
        await anext(pieces)


async def test_leaving_early_cancels_the_reading_and_check_says_so() -> None:
    archive, _ = await gzipped(random_home(600 * KiB))
    store = Store(archive)
    tar = VerifiedTar(store.stream(), expected_of(archive), sanitiser(), chunk_size=CHUNK)
    pieces = tar.pieces()
    await anext(pieces)
    await pieces.aclose()
    assert store.closed and store.read < len(archive) and tar.failure() is None
    with pytest.raises(AdapterError, match="not to the end"):
        tar.check("not to the end")


async def test_progress_goes_to_the_callback_per_chunk_then_extracting_once() -> None:
    archive, _ = await gzipped(random_home(500 * KiB))
    seen: list[Progress] = []
    await read_all(verified(archive, chunk=CHUNK, progress=seen))
    size = len(archive)
    downloads = [p for p in seen if p.phase == "downloading"]
    assert [p.done for p in downloads] == [min(n * CHUNK, size)
                                          for n in range(1, -(-size // CHUNK) + 1)]
    assert seen[-1] == Progress("extracting", size, size)
    assert [p.phase for p in seen].count("extracting") == 1


async def test_an_async_progress_callback_is_awaited() -> None:
    archive, _ = await gzipped(random_home(100 * KiB))
    seen: list[str] = []

    async def record(p: Progress) -> None:
        seen.append(p.phase)

    tar = VerifiedTar(pieces_of(archive, CHUNK), expected_of(archive), sanitiser(),
                      chunk_size=CHUNK, progress=record)
    await read_all(tar)
    assert seen[-1] == "extracting"


# --- HoldBack ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[1], [10, 10, 10], [7, 50, 3, 100, 1], [200], [5] * 40])
def test_hold_back_passes_everything_in_order_but_its_last_bytes(sizes: list[int]) -> None:
    hold = HoldBack(size=16)
    data = os.urandom(sum(sizes))
    passed = bytearray()
    at = 0
    for size in sizes:
        for piece in hold.push(data[at:at + size]):
            passed += piece
        at += size
        assert bytes(passed) == data[:len(passed)]
        assert len(passed) == max(0, at - 16)  # exactly the last 16 held
    assert bytes(passed) + hold.release(b"end") == data + b"end"
    assert hold.release() == b""
