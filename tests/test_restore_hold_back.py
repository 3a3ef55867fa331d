"""The restore's hold-back (codehub/storage/codec.py, through codehub/backends/docker/volumes.py):
an extractor never receives a complete tar that did not verify. The last 64 KiB of the tar
wait for the archive's sha256 and gzip trailer, so an archive corrupt only in its LAST
bytes, whose every earlier byte inflates to the right tar, still ends in a failed restore
whose extractor never got the end of the tar, with the archive kept and no volume left
behind.

Real Docker engine, archives in a real S3 API (moto server). What the extractor was sent
is recorded where it leaves this process: for Docker's put-archive by a relay in front of
the engine's socket that keeps every request byte (Docker answers every request itself);
for the tar helper by a recorder on the feed connection that passes every call through.
A slow progress sink holds the restore, once all but the archive's last read is in, until
the extractor has been sent everything it is going to get: the moment the hold-back is for.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import struct
import tarfile
import tempfile
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType

import aiodocker
import pytest
from harness.services import DockerEngine
from storage_support import MiB, end_of_members, make_storage, manifest, our_leftovers

from codehub.backends.docker.feed import FeedConnection
from codehub.backends.objects import S3ObjectStore
from codehub.interfaces import IntegrityError, Progress

pytestmark = pytest.mark.timeout(300)

HOLD_BACK = 64 * 1024  # the figure the guarantee names (not the module's constant)
CHUNK = MiB  # what the object store reads at a time; the archive is laid out against it
BULK = 16 * MiB  # enough that the extractor is sent most of the tar before the end


# --- the archive ---------------------------------------------------------------------------


def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.uid = info.gid = 1000
    info.mtime = 1_700_000_000
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tf.addfile(info)
    else:
        info.mode, info.size = 0o644, len(data)
        tf.addfile(info, io.BytesIO(data))


def home_tar(bulk: bytes, last: bytes) -> bytes:
    """A home as the restore hands it on (owner 1000, nothing for the filter to change):
    a big file, then `last.bin`, which lies within the tar's last 64 KiB."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        _add(tf, "coder")
        _add(tf, "coder/bulk.bin", bulk)
        _add(tf, "coder/last.bin", last)
    return buf.getvalue()


def gzip_member(tar: bytes) -> bytes:
    """One gzip member holding `tar` in stored blocks (so equal-length tars give equal-length
    archives), its header's file name padded so that the 8-byte trailer (CRC-32, length)
    is the object's last read all by itself: by then the whole tar has been inflated."""
    deflater = zlib.compressobj(0, zlib.DEFLATED, -15)
    body = deflater.compress(tar) + deflater.flush()
    pad = -(10 + 1 + len(body)) % CHUNK
    header = b"\x1f\x8b\x08\x08" + bytes(4) + b"\x00\xff" + b"p" * pad + b"\x00"
    blob = header + body + struct.pack("<II", zlib.crc32(tar), len(tar) & 0xFFFFFFFF)
    assert (len(blob) - 8) % CHUNK == 0
    return blob


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def until_still(count: Callable[[], int], quiet: float = 0.5, limit: float = 30) -> None:
    """Until `count()` has not moved for `quiet` seconds (at most `limit` seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last, since = count(), loop.time()
    while loop.time() - since < quiet and loop.time() < deadline:
        await asyncio.sleep(0.05)
        if (now := count()) != last:
            last, since = now, loop.time()


# --- what the extractor was sent -------------------------------------------------------------


class FeedRecorder:
    """Records what this process writes to the tar helper's feed connection and how it ends
    it; every call goes on to the real connection."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent = bytearray()
        self.endings: list[str] = []
        send, finish, abort = FeedConnection.send, FeedConnection.finish, FeedConnection.abort

        async def recording_send(conn: FeedConnection, data: bytes | memoryview) -> None:
            self.sent += data
            await send(conn, data)

        async def recording_finish(conn: FeedConnection) -> None:
            self.endings.append("finish")
            await finish(conn)

        def recording_abort(conn: FeedConnection) -> None:
            self.endings.append("abort")
            abort(conn)

        monkeypatch.setattr(FeedConnection, "send", recording_send)
        monkeypatch.setattr(FeedConnection, "finish", recording_finish)
        monkeypatch.setattr(FeedConnection, "abort", recording_abort)

    def extractor_got(self) -> tuple[bytes, bool]:
        """(the bytes sent, whether the stream was ended normally)."""
        return bytes(self.sent), "finish" in self.endings


class DockerRelay:
    """A unix socket in front of the engine's that passes every byte both ways and keeps
    those of every request. `docker` is a client through it; on leaving, every connection
    has been closed and recorded to its end."""

    def __init__(self, engine_url: str) -> None:
        self._engine = engine_url
        self._dir = tempfile.TemporaryDirectory(prefix="relay-")  # a socket path is short
        self._path = Path(self._dir.name) / "docker.sock"
        self.requests: list[bytearray] = []
        self._served: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.docker: aiodocker.Docker

    async def __aenter__(self) -> DockerRelay:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        self.docker = aiodocker.Docker(url=f"unix://{self._path}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.docker.close()
        assert self._server is not None
        self._server.close()
        if self._served:
            _, pending = await asyncio.wait(self._served, timeout=30)
            for task in pending:
                task.cancel()
        self._dir.cleanup()

    async def _upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._engine.startswith("unix://"):
            return await asyncio.open_unix_connection(self._engine.removeprefix("unix://"))
        host, _, port = self._engine.split("://", 1)[-1].rpartition(":")
        return await asyncio.open_connection(host, int(port))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._served.add(task)
        kept = bytearray()
        self.requests.append(kept)
        up_reader, up_writer = await self._upstream()
        await asyncio.gather(_pump(reader, up_writer, kept), _pump(up_reader, writer, None))

    def bytes_sent(self) -> int:
        return sum(len(r) for r in self.requests)

    def put_archive_body(self, helper_suffix: str) -> tuple[bytes, bool]:
        """(the body of the put-archive request to the helper whose name ends in
        `helper_suffix`, whether its chunked encoding was terminated)."""
        line = re.compile(rb"PUT \S+/containers/\S+%s/archive\S* HTTP/1\.1\r\n"
                          % re.escape(helper_suffix.encode()))
        found = [(m, bytes(r)) for r in self.requests if (m := line.search(r))]
        assert len(found) == 1, f"{len(found)} put-archive requests to *{helper_suffix}"
        match, raw = found[0]
        head_end = raw.index(b"\r\n\r\n", match.end()) + 4
        assert b"transfer-encoding: chunked" in raw[match.start():head_end].lower()
        body, pos = bytearray(), head_end
        while (eol := raw.find(b"\r\n", pos)) >= 0:
            size = int(raw[pos:eol].split(b";")[0], 16)
            if size == 0:
                return bytes(body), True
            body += raw[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
        return bytes(body), False


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                kept: bytearray | None) -> None:
    try:
        while data := await src.read(1 << 16):
            if kept is not None:
                kept += data
            dst.write(data)
            await dst.drain()
    except OSError:
        pass
    finally:
        dst.close()


# --- the test --------------------------------------------------------------------------------


@pytest.mark.parametrize("corrupt", ["gzip-trailer", "tar-tail"])
@pytest.mark.parametrize("restore_with", ["tar", "put-archive"])
async def test_the_extractor_never_gets_the_last_64_kib_of_a_tar_that_did_not_verify(
        restore_with: str, corrupt: str, s3_settings: dict[str, str],
        docker: aiodocker.Docker, docker_engine: DockerEngine, workspace_image: str,
        docker_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gzip-trailer`: the archive's last 8 bytes (CRC-32 and length) inverted. `tar-tail`:
    the last byte of the tar's last file changed in a well-formed gzip, so only the sha256
    can tell. Either way every byte of the tar but the corrupt ones is there to be sent
    before the archive is known to be bad."""
    bulk, last = os.urandom(BULK), os.urandom(16 * 1024)
    tar = home_tar(bulk, last)
    members_end = end_of_members(tar)
    good = gzip_member(tar)
    if corrupt == "gzip-trailer":
        bad = good[:-8] + bytes(b ^ 0xFF for b in good[-8:])
    else:
        bad = gzip_member(home_tar(bulk, last[:-1] + bytes([last[-1] ^ 0xFF])))
    assert len(bad) == len(good) and bad != good  # the stored size still matches

    async with S3ObjectStore(
            endpoint_url=s3_settings["endpoint_url"], region=s3_settings["region"],
            access_key_id=s3_settings["access_key_id"],
            secret_access_key=s3_settings["secret_access_key"],
            bucket=s3_settings["bucket"], chunk_size=CHUNK) as objects:
        storage = make_storage(docker, objects, docker_prefix, workspace_image, restore_with)
        key = storage.archive_key("w1")
        meta = await objects.put_stream(key, _one(good))
        assert meta.sha256 == hashlib.sha256(good).hexdigest()
        # The bytes change under the key; its meta (size, sha256) stays as it was.
        await objects.client.put_object(Bucket=objects.bucket, Key=key, Body=bad)

        # A slow progress sink, the strongest case for the hold-back: with all but the
        # archive's last read in, the restore waits until the extractor has been sent all
        # it is going to get before the last bytes are looked at.
        sent: Callable[[], int]

        async def slow_progress(progress: Progress) -> None:
            if progress.phase == "downloading" and progress.done == len(bad) - 8:
                await until_still(sent)

        if restore_with == "tar":
            feed = FeedRecorder(monkeypatch)
            sent = feed.sent.__len__
            with pytest.raises(IntegrityError) as caught:
                await storage.restore("w1", key, meta.sha256, progress=slow_progress)
            monkeypatch.undo()
            got, ended_normally = feed.extractor_got()
        else:
            async with DockerRelay(docker_engine.url) as relay:
                sent = relay.bytes_sent
                relayed = make_storage(relay.docker, objects, docker_prefix, workspace_image,
                                       restore_with)
                with pytest.raises(IntegrityError) as caught:
                    await relayed.restore("w1", key, meta.sha256, progress=slow_progress)
            monkeypatch.undo()
            got, ended_normally = relay.put_archive_body("-restorer")

        print(f"{restore_with}, {corrupt}: the extractor got {len(got)} of the {members_end}"
              f" bytes of members ({caught.value})")
        assert meta.sha256 in str(caught.value)
        # The extractor was streamed the tar as it is, cut off at least 64 KiB before the
        # end of its members (so without last.bin and without the end-of-archive marker),
        # and the stream was broken off, not ended.
        assert len(got) >= BULK // 4, "the recorder saw no stream to speak of"
        assert got == tar[:len(got)]
        assert len(got) <= members_end - HOLD_BACK, (
            f"the extractor got {len(got)} bytes of a tar whose members end at "
            f"{members_end}: only {members_end - len(got)} were held back")
        assert not ended_normally
        # The archive is kept as it is; nothing is left, not even a half-filled volume.
        assert await objects.head(key) == meta
        assert b"".join([c async for c in objects.get_stream(key)]) == bad
        assert await our_leftovers(docker, docker_prefix) == ([], [])

        # Only the corrupt bytes failed it: the archive as it was restores, last.bin too.
        await objects.client.put_object(Bucket=objects.bucket, Key=key, Body=good)
        restored = await storage.restore("w1", key, meta.sha256)
        files = await manifest(docker, restored, workspace_image)
        assert files["coder/last.bin"][6] == hashlib.sha256(last).hexdigest()
        assert files["coder/bulk.bin"][4] == BULK
