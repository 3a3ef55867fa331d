"""Helpers for the storage tests: volumes filled and inspected through Docker's archive API
(nothing runs in any image), manifests of a home, and what a test left behind."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest

from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import S3ObjectStore

MiB = 1024 * 1024
BAD_NAME = os.fsdecode(b"coder/not-utf8-\xff\xfe-name")  # surrogate-escaped bytes
Manifest = dict[str, tuple[Any, ...]]



def s3_objects(settings: dict[str, str]) -> S3ObjectStore:
    return S3ObjectStore(endpoint_url=settings["endpoint_url"], region=settings["region"],
                         access_key_id=settings["access_key_id"],
                         secret_access_key=settings["secret_access_key"],
                         bucket=settings["bucket"])


def make_storage(docker: aiodocker.Docker, objects: S3ObjectStore, prefix: str,
                 image: str, restore_with: str = "tar") -> DockerVolumeStorage:
    """As the gateway makes it; restores through a tar helper on a network of the test's
    own (`<prefix>-restore`), or through Docker's put-archive."""
    network = BridgeNetwork(docker, f"{prefix}-restore") if restore_with == "tar" else None
    return DockerVolumeStorage(docker=docker, objects=objects, helper_image=image,
                               volume_prefix=f"{prefix}-home-", restore_network=network)


async def _with_helper(docker: aiodocker.Docker, volume: str, image: str, read_only: bool
                       ) -> str:
    name = f"{volume}-test-{os.urandom(3).hex()}"
    await docker.containers.create({
        "Image": image, "Entrypoint": ["/never"], "NetworkDisabled": True,
        "HostConfig": {"Mounts": [{"Type": "volume", "Source": volume, "Target": "/home/coder",
                                   "ReadOnly": read_only, "VolumeOptions": {"NoCopy": True}}]},
    }, name=name)
    return name


async def put_tar(docker: aiodocker.Docker, volume: str, image: str, data: Any) -> None:
    """Extract a tar (file object or async iterator of bytes) whose top entry is `coder/`
    into the volume's root."""
    helper = await _with_helper(docker, volume, image, read_only=False)
    try:
        async with docker._query(f"containers/{helper}/archive", "PUT",
                                 params={"path": "/home"}, data=data,
                                 headers={"Content-Type": "application/x-tar"}) as resp:
            await resp.read()
    finally:
        await docker.containers.container(helper).delete(force=True)


def end_of_members(tar: bytes) -> int:
    """Where the tar's end-of-archive marker begins: everything before it is members."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        last = tf.getmembers()[-1]
    return last.offset_data + -(-last.size // 512) * 512


def as_restored(before: Manifest, uid: int = 1000, gid: int = 1000) -> Manifest:
    """What a restore of a home with manifest `before` gives back: the same entries, all
    owned by the home's owner, no setuid/setgid bits (codehub.storage.tarfilter)."""
    return {name: (kind, oct(int(mode, 8) & 0o1777), uid, gid, *rest)
            for name, (kind, mode, _uid, _gid, *rest) in before.items()}


async def manifest(docker: aiodocker.Docker, volume: str, image: str) -> Manifest:
    """Every entry of the volume as Docker's archive API reads it (through a temp file, so
    memory stays small for big volumes)."""
    helper = await _with_helper(docker, volume, image, read_only=True)
    try:
        with tempfile.TemporaryFile() as spool:
            async with docker._query(f"containers/{helper}/archive",
                                     params={"path": "/home/coder"},
                                     headers={"Accept-Encoding": "identity"}) as resp:
                while chunk := await resp.content.read(MiB):
                    spool.write(chunk)
            spool.seek(0)
            return await asyncio.to_thread(manifest_of_tar, spool)
    finally:
        await docker.containers.container(helper).delete(force=True)


def manifest_of_tar(fileobj: Any) -> Manifest:
    entries: Manifest = {}
    with tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8",
                      errors="surrogateescape") as tf:
        for m in tf:
            digest = None
            if m.isreg():
                f = tf.extractfile(m)
                assert f is not None
                h = hashlib.sha256()
                while block := f.read(MiB):
                    h.update(block)
                digest = h.hexdigest()
            kind = {tarfile.REGTYPE: "file", tarfile.AREGTYPE: "file", tarfile.DIRTYPE: "dir",
                    tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink"}.get(m.type, m.type)
            # Docker's tar writer adds the file-type bits to mode; `kind` carries the type.
            entries[m.name.rstrip("/")] = (kind, oct(m.mode & 0o7777), m.uid, m.gid, m.size,
                                           int(m.mtime), digest, m.linkname or None)
    return entries


def _member(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, uid: int = 1000,
            gid: int = 1000, size: int = 0, link: str = "", mtime: int = 1_700_000_000
            ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.size = size
    info.linkname = link
    info.mtime = mtime
    return info


def build_tree_tar(path: Path, *, big_bytes: int = 0, small_files: int = 0) -> None:
    """A tar of a home holding every kind of entry a round trip must keep."""
    rnd = os.urandom(64 * 1024)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tf:
        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data else None)

        def add_dir(name: str, **kw: Any) -> None:
            tf.addfile(_member(name, tarfile.DIRTYPE, mode=kw.pop("mode", 0o755), **kw))

        add_dir("coder", mode=0o750)
        add(_member("coder/.bashrc"), b"export PS1='$ '\n")
        add_dir("coder/.config", mode=0o700)
        add(_member("coder/.config/settings.json", mode=0o600), b'{"a": 1}\n')
        add(_member("coder/run.sh", mode=0o755), b"#!/bin/sh\necho hi\n")
        add(_member("coder/root-owned", uid=0, gid=0, mode=0o644), b"root\n")
        add(_member("coder/other-owned", uid=1234, gid=4321, mode=0o640), b"other\n")
        add(_member("coder/nobody", uid=65534, gid=65534, mode=0o444), b"nobody\n")
        add(_member("coder/setuid", uid=0, gid=0, mode=0o4755), b"suid\n")
        add_dir("coder/setgid-dir", mode=0o2775)
        add_dir("coder/sticky", mode=0o1777)
        add(_member("coder/empty-file"), b"")
        add_dir("coder/empty-dir")
        add_dir("coder/deep")
        add_dir("coder/deep/a")
        add_dir("coder/deep/a/b")
        add_dir("coder/deep/a/b/empty", mode=0o711)
        tf.addfile(_member("coder/link-rel", tarfile.SYMTYPE, mode=0o777, link="run.sh"))
        tf.addfile(_member("coder/link-abs", tarfile.SYMTYPE, mode=0o777, link="/etc/passwd"))
        tf.addfile(_member("coder/link-dangling", tarfile.SYMTYPE, mode=0o777, link="nowhere"))
        tf.addfile(_member("coder/link-dir", tarfile.SYMTYPE, mode=0o777, link=".config"))
        tf.addfile(_member("coder/hardlink", tarfile.LNKTYPE, link="coder/run.sh"))
        add(_member(BAD_NAME), b"latin-1 bytes in the name\n")
        add(_member("coder/ünïcødé ファイル.txt"), b"utf-8 name\n")
        add(_member("coder/with space\tand tab"), b"odd\n")
        add(_member("coder/" + "long-" * 40 + "name"), b"long name\n")
        if small_files:
            add_dir("coder/many")
            for i in range(small_files):
                if i % 100 == 0:
                    add_dir(f"coder/many/d{i // 100:02d}")
                add(_member(f"coder/many/d{i // 100:02d}/f{i:05d}.txt", mode=0o644 | (i % 2)),
                    rnd[i % 997:(i % 997) + (i * 37) % 4096])
        if big_bytes:
            info = _member("coder/big.bin", size=big_bytes)
            tf.addfile(info, _RandomReader(big_bytes))


class _RandomReader(io.RawIOBase):
    """`size` incompressible bytes without holding them in memory."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = min(len(b), self._left)
        b[:n] = os.urandom(n)
        self._left -= n
        return n


async def fill_volume(docker: aiodocker.Docker, volume: str, image: str, tmp: Path, **kw: Any
                      ) -> None:
    tar_path = tmp / "tree.tar"
    await asyncio.to_thread(build_tree_tar, tar_path, **kw)
    f = await asyncio.to_thread(open, tar_path, "rb")
    try:
        await put_tar(docker, volume, image, f)
    finally:
        f.close()
        tar_path.unlink()


async def our_leftovers(docker: aiodocker.Docker, prefix: str) -> tuple[list[str], list[str]]:
    """(volumes, containers) whose name contains `prefix`."""
    vols = (await docker.volumes.list()).get("Volumes") or []
    containers = await docker.containers.list(all=True)
    return (sorted(v["Name"] for v in vols if prefix in v["Name"]),
            sorted(n.lstrip("/") for c in containers for n in c["Names"] if prefix in n))


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
async def objects(s3_settings: dict[str, str]) -> AsyncIterator[S3ObjectStore]:
    async with s3_objects(s3_settings) as store:
        yield store


@pytest.fixture
def storage(docker: aiodocker.Docker, objects: S3ObjectStore, docker_prefix: str,
            workspace_image: str) -> DockerVolumeStorage:
    return make_storage(docker, objects, docker_prefix, workspace_image)
