"""A hostile archive restored through the real reconciler path (real PostgreSQL, Docker,
S3): whoever can write the bucket and the row's sha256 gets nothing dangerous into a
home, and nothing outside the new volume changes. And a home over the size limit ends in
ERROR with its archive kept and no volume left behind."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

from reconciler_stack import Stack

from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.constants import LABEL_MANAGED_BY
from codehub.model import DesiredState, Status


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, *,
         data: bytes = b"", mode: int = 0o644, uid: int = 1000, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, uid, link
    info.mtime = 1_700_000_000
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _host_files(paths: tuple[str, ...]) -> dict[str, bytes | None]:
    return {p: Path(p).read_bytes() if Path(p).exists() else None for p in paths}


HOST_FILES = ("/etc/shadow", "/etc/passwd", "/etc/codehub-evil", "/etc/codehub-absolute",
              "/etc/codehub-through-link")


def hostile_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        _add(tf, "coder", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "coder/keep.txt", data=b"my work\n")
        _add(tf, "coder/project", tarfile.DIRTYPE, mode=0o750)
        _add(tf, "coder/project/main.py", data=b"print('hi')\n", mode=0o755)
        _add(tf, "coder/link", tarfile.SYMTYPE, link="project/main.py")
        _add(tf, "coder/hard", tarfile.LNKTYPE, link="coder/keep.txt")
        _add(tf, "coder/rootshell", data=b"#!/bin/sh\nid\n", mode=0o4755, uid=0)
        _add(tf, "coder/null", tarfile.CHRTYPE, uid=0)
        _add(tf, "coder/disk", tarfile.BLKTYPE, uid=0)
        _add(tf, "coder/pipe", tarfile.FIFOTYPE, uid=0)
        _add(tf, "coder/../../etc/codehub-evil", data=b"x")
        _add(tf, "/etc/codehub-absolute", data=b"x")
        _add(tf, "coder/sys", tarfile.SYMTYPE, link="/etc")
        _add(tf, "coder/sys/codehub-through-link", data=b"x")
        _add(tf, "coder/shadow", tarfile.LNKTYPE, link="/etc/shadow")
    return gzip.compress(buf.getvalue())


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _replace_archive(stack: Stack, wid: str, blob: bytes) -> None:
    """What an attacker with the bucket and the database would do."""
    ws = await stack.store.get(wid)
    assert ws is not None and ws.archive_key
    meta = await stack.objects.put_stream(ws.archive_key, _chunks(blob))
    assert meta.sha256 == hashlib.sha256(blob).hexdigest()
    async with stack.pool.acquire() as conn:
        await conn.execute("UPDATE workspaces SET archive_sha256 = $1, archive_size = $2 "
                           "WHERE id = $3", meta.sha256, meta.size, wid)


async def _to_cold(stack: Stack, wid: str) -> None:
    stack.run_controller()
    await stack.create(wid)
    await stack.wait_status(wid, Status.RUNNING)
    await stack.want(wid, DesiredState.COLD)
    await stack.wait_status(wid, Status.COLD)


# A name made by another test's prefix (docker_prefix: t + 7 hex; the gateway tests' stack:
# g + 7 hex): tests run in parallel.
OTHER_RUN = re.compile(r"[tg][0-9a-f]{7}-")


async def _volumes(stack: Stack) -> set[str]:
    """The engine's volumes, but those made for other tests sharing the engine (labelled as
    CodeHub's, or named with another test's prefix): an archive sets no label."""
    listed = (await stack.docker.volumes.list())["Volumes"] or []
    return {v["Name"] for v in listed
            if v["Name"].startswith(stack.prefix)
            or ((v.get("Labels") or {}).get(LABEL_MANAGED_BY) != "codehub"
                and not OTHER_RUN.match(v["Name"]))}


async def test_a_hostile_archive_brings_back_only_the_users_own_files(stack: Stack) -> None:
    host_before = await asyncio.to_thread(_host_files, HOST_FILES)
    volumes_before = await _volumes(stack)
    await _to_cold(stack, "gamma")
    await _replace_archive(stack, "gamma", hostile_archive())
    await stack.want("gamma", DesiredState.RUNNING)
    ws = await stack.wait_status("gamma", Status.RUNNING)
    seen = await stack.exec("gamma", r"""
import json, os, stat
out = {}
for root, dirs, files in os.walk("/home/coder"):
    for name in dirs + files:
        p = os.path.join(root, name)
        st = os.lstat(p)
        out[os.path.relpath(p, "/home/coder")] = [stat.filemode(st.st_mode), st.st_uid,
                                                  st.st_gid, st.st_nlink]
print(json.dumps(out))
""")
    entries = json.loads(seen)
    # The FIFO stays (a FIFO of the workspace's own user grants nothing).
    assert sorted(entries) == ["hard", "keep.txt", "link", "pipe", "project",
                               "project/main.py", "rootshell", "sys"]
    assert entries["pipe"][0].startswith("p")
    assert entries["rootshell"][:3] == ["-rwxr-xr-x", 1000, 1000]
    assert entries["keep.txt"][3] == 2 and entries["hard"][3] == 2  # the in-home hard link
    assert entries["link"][0].startswith("l") and entries["sys"][0].startswith("l")
    assert all(uid == gid == 1000 for _, uid, gid, _ in entries.values())
    assert await stack.exec("gamma", "print(open('/home/coder/keep.txt').read(), end='')") \
        == "my work\n"
    # Nothing outside the new volume changed: the host's files, and the volumes there are.
    assert await asyncio.to_thread(_host_files, HOST_FILES) == host_before
    assert host_before["/etc/codehub-evil"] is None
    assert await _volumes(stack) - volumes_before == {ws.home_store_key}


async def test_a_restore_over_the_home_size_limit_ends_in_error_and_keeps_the_archive(
        stack: Stack) -> None:
    stack.storage = DockerVolumeStorage(
        docker=stack.docker, objects=stack.objects, helper_image=stack.image,
        volume_prefix=f"{stack.prefix}-home-", home_size_limit=1 << 20)
    await _to_cold(stack, "delta")
    big = io.BytesIO()
    with tarfile.open(fileobj=big, mode="w") as tf:
        _add(tf, "coder", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "coder/a.bin", data=bytes(700_000))
        _add(tf, "coder/b.bin", data=bytes(700_000))  # compresses to nearly nothing
    blob = gzip.compress(big.getvalue())
    await _replace_archive(stack, "delta", blob)
    before = await stack.store.get("delta")
    await stack.want("delta", DesiredState.WARM)
    async with asyncio.timeout(60):  # ERROR keeps the failed operation for a retry
        while (ws := await stack.store.get("delta")) is None or ws.status is not Status.ERROR:
            await asyncio.sleep(0.1)
    assert ws.error_message and "size limit" in ws.error_message
    assert ws.archive_sha256 == before.archive_sha256  # type: ignore[union-attr]
    head = await stack.objects.head(ws.archive_key)  # type: ignore[arg-type]
    assert head is not None and head.sha256 == hashlib.sha256(blob).hexdigest()
    left = await stack.leftovers()
    assert left["volumes"] == [] and left["containers"] == []
