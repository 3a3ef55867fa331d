"""DockerVolumeStorage (codehub/backends/docker/volumes.py) on the real Docker engine with archives
in a real S3 API (moto server).

Volumes are filled and read back only through Docker's archive API on helper containers, and
compared by manifest: (path, type, mode, uid, gid, size, mtime, sha256, link target) of
every entry. The helpers at the top are shared with tests/test_failpoints.py.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from storage_support import (
    BAD_NAME,
    MiB,
    _member,
    as_restored,
    fill_volume,
    make_storage,
    manifest,
    manifest_of_tar,
    our_leftovers,
    put_tar,
)

import codehub.backends.docker.helpers as helpers_module
from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import S3ObjectStore
from codehub.constants import LABEL_MANAGED_BY, LABEL_WORKSPACE_ID
from codehub.interfaces import AdapterError, IntegrityError, PermanentError, Progress
from codehub.model import VolumeState
from codehub.rlimit import pin_mmap_threshold

pytestmark = pytest.mark.timeout(600)





# --- tests --------------------------------------------------------------------------------


async def test_provision_is_idempotent_and_labels_the_volume(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, docker_prefix: str) -> None:
    name = await storage.provision("w1")
    assert name == f"{docker_prefix}-home-w1"
    assert await storage.provision("w1") == name
    info = await (await docker.volumes.get(name)).show()
    assert info["Labels"][LABEL_MANAGED_BY] == "codehub"
    assert info["Labels"][LABEL_WORKSPACE_ID] == "w1"
    assert await storage.get_volume_status("w1", name) is VolumeState.PRESENT
    assert await storage.get_volume_status("w1", name + "-nope") is VolumeState.MISSING
    found = await storage.list_managed()
    assert [(r.kind, r.name, r.workspace_id) for r in found] == [("volume", name, "w1")]


async def test_provision_refuses_a_volume_that_is_not_ours(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, docker_prefix: str) -> None:
    await docker.volumes.create({"Name": f"{docker_prefix}-home-w1"})
    with pytest.raises(PermanentError):
        await storage.provision("w1")
    with pytest.raises(PermanentError):
        await storage.delete_volume("w1", f"{docker_prefix}-home-w1")
    await docker.volumes.get(f"{docker_prefix}-home-w1")  # untouched


@pytest.mark.parametrize("restore_with", ["tar", "put-archive"])
async def test_round_trip_keeps_modes_owners_links_empty_dirs_big_and_odd_files(
        restore_with: str, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str, docker_prefix: str, tmp_path: Path) -> None:
    storage = make_storage(docker, objects, docker_prefix, workspace_image, restore_with)
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=200 * MiB,
                      small_files=2000)
    before = await manifest(docker, volume, workspace_image)
    # The filler really made what the round trip must keep (else equality proves little).
    assert before["coder"][:4] == ("dir", oct(0o750), 1000, 1000)
    assert before[BAD_NAME][0] == "file"
    assert before["coder/other-owned"][2:4] == (1234, 4321)
    assert before["coder/setuid"][1] == oct(0o4755)
    assert before["coder/sticky"][1] == oct(0o1777)
    assert before["coder/link-abs"][7] == "/etc/passwd"
    # Docker writes the first name of an inode as a file, later ones as links to it.
    assert {before["coder/hardlink"][0], before["coder/run.sh"][0]} == {"file", "hardlink"}
    assert before["coder/deep/a/b/empty"][0] == "dir"
    assert before["coder/big.bin"][4] == 200 * MiB
    assert sum(1 for k in before if k.startswith("coder/many/d")) == 2000 + 20

    info = await storage.archive("w1", volume)
    assert info.key == "w1/home.tar.gz"
    head = await objects.head(info.key)
    assert head is not None and (head.size, head.sha256) == (info.size, info.sha256)
    assert await manifest(docker, volume, workspace_image) == before  # archive deletes nothing

    restored = await storage.restore("w1", info.key, info.sha256)
    assert restored == f"{docker_prefix}-home-w1-r{info.sha256[:12]}"
    after = await manifest(docker, restored, workspace_image)
    # Everything comes back as it was, but owned by the home's owner and without setuid
    # or setgid bits (codehub.storage.tarfilter).
    expected = as_restored(before)
    assert expected["coder/setuid"][1] == oct(0o755)
    assert expected["coder/other-owned"][2:4] == (1000, 1000)
    assert after == expected
    assert (await objects.head(info.key)) == head  # restore leaves the archive as it was
    volumes, containers = await our_leftovers(docker, docker_prefix)
    assert volumes == sorted([volume, restored])
    assert containers == []  # no helper left behind


async def test_archive_is_plain_gzip_of_a_tar_rooted_at_coder(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str, tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path)
    info = await storage.archive("w1", volume)
    blob = b"".join([c async for c in objects.get_stream(info.key)])
    assert hashlib.sha256(blob).hexdigest() == info.sha256
    gunzip = await asyncio.to_thread(subprocess.run, ["gzip", "-d"], input=blob,
                                     capture_output=True, check=True)
    plain = gunzip.stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        names = tf.getnames()
    assert names[0] == "coder"
    assert all(n == "coder" or n.startswith("coder/") for n in names)
    assert gzip.decompress(blob) == plain


@pytest.mark.parametrize("restore_with", ["tar", "put-archive"])
async def test_restore_of_a_corrupted_archive_raises_and_keeps_the_archive(
        restore_with: str, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str, docker_prefix: str, tmp_path: Path) -> None:
    storage = make_storage(docker, objects, docker_prefix, workspace_image, restore_with)
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=3 * MiB)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    meta_before = await objects.head(info.key)

    blob = bytearray(b"".join([c async for c in objects.get_stream(info.key)]))
    blob[len(blob) // 2] ^= 0x01  # one bit of one byte; meta left as it was
    await objects.client.put_object(Bucket=objects.bucket, Key=info.key, Body=bytes(blob))

    with pytest.raises(IntegrityError) as caught:
        await storage.restore("w1", info.key, info.sha256)
    assert info.sha256 in str(caught.value)
    assert await objects.head(info.key) == meta_before
    assert b"".join([c async for c in objects.get_stream(info.key)]) == bytes(blob)
    assert await our_leftovers(docker, docker_prefix) == ([], [])


async def test_restore_refuses_an_archive_whose_meta_disagrees_before_touching_docker(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    with pytest.raises(IntegrityError):
        await storage.restore("w1", info.key, "0" * 64)
    with pytest.raises(PermanentError):
        await storage.restore("w1", "w1/missing.tar.gz", info.sha256)
    assert await our_leftovers(docker, docker_prefix) == ([], [])


async def test_restore_is_idempotent_and_a_rerun_replaces_a_half_made_volume(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path)
    expected = await manifest(docker, volume, workspace_image)
    info = await storage.archive("w1", volume)
    first = await storage.restore("w1", info.key, info.sha256)
    # A killed run would leave junk in the volume of that name: the re-run starts afresh.
    junk = io.BytesIO()
    with tarfile.open(fileobj=junk, mode="w") as tf:
        tf.addfile(_member("coder", tarfile.DIRTYPE, mode=0o755))
        tf.addfile(_member("coder/junk", size=4), io.BytesIO(b"junk"))
    junk.seek(0)
    await put_tar(docker, first, workspace_image, junk)
    second = await storage.restore("w1", info.key, info.sha256)
    assert second == first
    assert await manifest(docker, second, workspace_image) == as_restored(expected)


async def test_archive_reports_progress_and_restore_reports_totals(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=5 * MiB)
    seen: list[Progress] = []

    async def record(p: Progress) -> None:
        seen.append(p)

    info = await storage.archive("w1", volume, progress=record)
    phases = [p.phase for p in seen]
    assert phases[0] == "reading" and phases[-1] == "verifying"
    reading = [p.done for p in seen if p.phase == "reading"]
    assert reading == sorted(reading) and reading[-1] > 5 * MiB
    assert seen[-1].done == info.size

    seen.clear()
    await storage.restore("w1", info.key, info.sha256, progress=seen.append)
    assert {p.phase for p in seen} == {"downloading", "extracting"}
    assert all(p.total == info.size for p in seen)
    assert seen[-1] == Progress("extracting", info.size, info.size)


async def test_deletes_are_idempotent_remove_stale_helpers_and_ignore_what_is_missing(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        docker_prefix: str) -> None:
    volume = await storage.provision("w1")
    info = await storage.archive("w1", volume)
    # A helper a killed archive left behind pins the volume; delete_volume removes it.
    await storage.helpers.create(volume, "w1", "archiver", read_only=True)
    for _ in range(2):
        await storage.delete_volume("w1", volume)
        assert await storage.get_volume_status("w1", volume) is VolumeState.MISSING
        await storage.delete_archive("w1", info.key)
        assert await objects.head(info.key) is None
    assert await our_leftovers(docker, docker_prefix) == ([], [])
    assert await objects.list_keys() == []


async def test_archive_of_a_missing_volume_is_permanent(storage: DockerVolumeStorage,
                                                        docker: aiodocker.Docker,
                                                        docker_prefix: str) -> None:
    with pytest.raises(PermanentError):
        await storage.archive("w1", f"{docker_prefix}-home-w1")
    # Docker auto-creates volumes named in mounts: make sure nothing was.
    assert await our_leftovers(docker, docker_prefix) == ([], [])


async def test_missing_helper_image_is_a_permanent_error_naming_it(
        docker: aiodocker.Docker, objects: S3ObjectStore, docker_prefix: str) -> None:
    image = f"codehub-no-such-helper-{docker_prefix}:v1"
    storage = make_storage(docker, objects, docker_prefix, image)
    volume = await storage.provision("w1")
    with pytest.raises(PermanentError) as caught:
        await storage.archive("w1", volume)
    assert image in str(caught.value)


async def test_archive_of_a_tar_stream_cut_short_fails_and_stores_nothing(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str, docker_prefix: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Docker ends the HTTP response normally even when its tar writer fails midway; such a
    stream lacks the end-of-archive marker and must never become an archive."""
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=4 * MiB)
    before = await manifest(docker, volume, workspace_image)
    real = helpers_module.read_block
    blocks = 0

    async def cut_after_two_blocks(content: Any, size: int) -> bytes:
        nonlocal blocks
        blocks += 1
        return b"" if blocks > 2 else await real(content, size)

    monkeypatch.setattr(helpers_module, "read_block", cut_after_two_blocks)
    with pytest.raises(AdapterError, match="end-of-archive"):
        await storage.archive("w1", volume)
    monkeypatch.undo()
    assert await objects.head("w1/home.tar.gz") is None
    assert await manifest(docker, volume, workspace_image) == before
    assert await our_leftovers(docker, docker_prefix) == ([volume], [])


class _PartTwoFails(S3ObjectStore):
    async def _upload_part(self, key: str, upload_id: str, number: int, part: bytes,
                           total: Any) -> dict[str, Any]:
        if number == 2:
            raise AdapterError("injected: the store refused part 2")
        return await super()._upload_part(key, upload_id, number, part, total)


async def test_archive_failing_in_the_store_midway_leaves_volume_and_no_object(
        docker: aiodocker.Docker, s3_settings: dict[str, str], workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    async with _PartTwoFails(**s3_settings, part_size=5 * MiB) as failing:
        storage = make_storage(docker, failing, docker_prefix, workspace_image)
        volume = await storage.provision("w1")
        await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=12 * MiB)
        before = await manifest(docker, volume, workspace_image)
        with pytest.raises(AdapterError, match="part 2"):
            await storage.archive("w1", volume)
        assert await failing.head("w1/home.tar.gz") is None
        uploads = await failing.client.list_multipart_uploads(Bucket=failing.bucket)
        assert not uploads.get("Uploads")
        assert await manifest(docker, volume, workspace_image) == before
        assert await our_leftovers(docker, docker_prefix) == ([volume], [])


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return False
    return True


async def _generated_tar(total: int, files: int = 4) -> AsyncIterator[bytes]:
    """A tar of `files` files of total `total` bytes, made on the fly. Each 64 KiB block has
    8 KiB of fresh randomness, so gzip shrinks it about 8x but not to nothing."""
    yield _member("coder", tarfile.DIRTYPE, mode=0o755).tobuf(tarfile.GNU_FORMAT)
    per_file = total // files
    pool = [os.urandom(8 * 1024) for _ in range(64)]
    zeros = bytes(56 * 1024)
    for n in range(files):
        yield _member(f"coder/data-{n}.bin", size=per_file).tobuf(tarfile.GNU_FORMAT)
        block = bytearray()
        for i in range(per_file // (64 * 1024)):
            block += pool[(i * 7 + n) % 64] + zeros
            if len(block) >= MiB:
                yield bytes(block)
                block.clear()
        if block:
            yield bytes(block)
        pad = -per_file % 512
        if pad:
            yield bytes(pad)
    yield bytes(1024)


@pytest.mark.slow
async def test_archiving_and_restoring_a_2gb_volume_keep_rss_growth_under_64mib(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str) -> None:
    volume = await storage.provision("w1")
    size = 2 * 1024 * MiB
    await put_tar(docker, volume, workspace_image, _generated_tar(size))
    if not _reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable: cannot reset the peak RSS")
    assert pin_mmap_threshold()  # as `codehub serve` does at start (rlimit.py)
    before = _vm_kib("VmRSS")
    info = await storage.archive("w1", volume)
    peak = _vm_kib("VmHWM")
    growth_mib = (peak - before) / 1024
    print(f"archive of {size / MiB:.0f} MiB -> {info.size / MiB:.0f} MiB object; "
          f"RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
          f"growth {growth_mib:.1f} MiB")
    assert info.size > 100 * MiB  # big enough that the multipart path was exercised
    assert growth_mib < 64

    await storage.delete_volume("w1", volume)
    _reset_peak_rss()
    before = _vm_kib("VmRSS")
    restored = await storage.restore("w1", info.key, info.sha256)
    peak = _vm_kib("VmHWM")
    growth_mib = (peak - before) / 1024
    print(f"restore of it: RSS before {before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
          f"growth {growth_mib:.1f} MiB")
    assert restored
    assert growth_mib < 64


class _StreamBreaksAfter(S3ObjectStore):
    """An S3 store whose reads fail after a few chunks (fault injection around a real one)."""

    async def get_stream(self, key: str) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in super().get_stream(key):
            if sent == 3:
                raise AdapterError("injected: the store connection broke")
            sent += 1
            yield chunk


async def test_restore_whose_download_breaks_midway_fails_and_leaves_no_volume(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, objects: S3ObjectStore,
        s3_settings: dict[str, str], workspace_image: str, docker_prefix: str,
        tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=24 * MiB)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    async with _StreamBreaksAfter(**s3_settings, chunk_size=MiB) as breaking:
        flaky = make_storage(docker, breaking, docker_prefix, workspace_image)
        with pytest.raises(AdapterError, match="connection broke"):
            await flaky.restore("w1", info.key, info.sha256)
    assert await our_leftovers(docker, docker_prefix) == ([], [])
    assert (await objects.head(info.key)) is not None
    restored = await storage.restore("w1", info.key, info.sha256)  # the archive still works
    assert restored


def test_manifest_sees_every_field_it_compares() -> None:
    """The comparison is only as good as the manifest: a change in any field must show."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(_member("coder/x", size=3, mode=0o600), io.BytesIO(b"abc"))
    base = manifest_of_tar(io.BytesIO(buf.getvalue()))
    for change in ({"mode": 0o644}, {"uid": 1}, {"gid": 1}, {"mtime": 1}):
        other = io.BytesIO()
        with tarfile.open(fileobj=other, mode="w") as tf:
            tf.addfile(_member("coder/x", size=3, **{"mode": 0o600, **change}),
                       io.BytesIO(b"abc"))
        assert manifest_of_tar(io.BytesIO(other.getvalue())) != base, change
    other = io.BytesIO()
    with tarfile.open(fileobj=other, mode="w") as tf:
        tf.addfile(_member("coder/x", size=3, mode=0o600), io.BytesIO(b"abd"))
    assert manifest_of_tar(io.BytesIO(other.getvalue())) != base


# --- the tar helper (archive.restore_with = "tar") ------------------------------------------


async def test_tar_helper_is_confined_to_the_restore_network_with_a_read_only_root(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=8 * MiB)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    seen: list[dict[str, Any]] = []
    helper = f"{storage.restored_volume_name('w1', info.sha256)}-restorer"

    async def look(progress: Progress) -> None:
        if progress.phase == "downloading" and not seen:
            seen.append(await (await docker.containers.get(helper)).show())

    await storage.restore("w1", info.key, info.sha256, progress=look)
    assert seen, "the helper was never seen running"
    config, host = seen[0]["Config"], seen[0]["HostConfig"]
    assert seen[0]["State"]["Running"]
    assert list(seen[0]["NetworkSettings"]["Networks"]) == [f"{docker_prefix}-restore"]
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"] and "NET_RAW" not in host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert not host.get("PortBindings") and not host.get("PublishAllPorts")
    assert config["Labels"][LABEL_MANAGED_BY] == "codehub"
    assert config["Labels"][LABEL_WORKSPACE_ID] == "w1"
    token = [e for e in config["Env"] if e.startswith("CODEHUB_FEED_TOKEN=")]
    assert len(token) == 1 and len(token[0].split("=", 1)[1]) == 64
    assert await our_leftovers(docker, docker_prefix) == (
        [storage.restored_volume_name("w1", info.sha256)], [])


async def test_restore_whose_tar_helper_dies_midway_fails_and_leaves_no_volume(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, objects: S3ObjectStore,
        workspace_image: str, docker_prefix: str, tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path, big_bytes=48 * MiB)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    helper = f"{storage.restored_volume_name('w1', info.sha256)}-restorer"
    killed: list[str] = []

    async def kill(progress: Progress) -> None:
        if progress.phase == "downloading" and not killed:
            await docker.containers.container(helper).kill()
            killed.append(helper)

    with pytest.raises(AdapterError, match="restorer"):
        await storage.restore("w1", info.key, info.sha256, progress=kill)
    assert killed
    assert await our_leftovers(docker, docker_prefix) == ([], [])
    assert (await objects.head(info.key)) is not None
    assert await storage.restore("w1", info.key, info.sha256)  # the archive still works


async def test_tar_helper_image_without_bash_is_a_permanent_error_naming_the_setting(
        objects: S3ObjectStore, docker: aiodocker.Docker, workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    storage = make_storage(docker, objects, docker_prefix, workspace_image)
    volume = await storage.provision("w1")
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    image = "codehub-test-no-shell:latest"
    layer = io.BytesIO()
    text = b"an image with nothing to run\n"
    with tarfile.open(fileobj=layer, mode="w") as tf:
        tf.addfile(_member("README", size=len(text)), io.BytesIO(text))
    async with docker._query("images/create", "POST", data=layer.getvalue(),
                             params={"fromSrc": "-", "repo": "codehub-test-no-shell",
                                     "tag": "latest"},
                             headers={"Content-Type": "application/x-tar"}) as resp:
        await resp.read()
    try:
        bare = make_storage(docker, objects, docker_prefix, image)
        with pytest.raises(PermanentError, match=r"archive\.restore_with") as caught:
            await bare.restore("w1", info.key, info.sha256)
        assert image in str(caught.value)
    finally:
        await docker.images.delete(image, force=True)
    assert await our_leftovers(docker, docker_prefix) == ([], [])
    assert await storage.restore("w1", info.key, info.sha256)


async def test_restore_makes_its_network_again_when_it_was_removed_behind_its_back(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        docker_prefix: str, tmp_path: Path) -> None:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, workspace_image, tmp_path)
    expected = await manifest(docker, volume, workspace_image)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    first = await storage.restore("w1", info.key, info.sha256)
    await storage.delete_volume("w1", first)
    await (await docker.networks.get(f"{docker_prefix}-restore")).delete()
    again = await storage.restore("w1", info.key, info.sha256)
    assert await manifest(docker, again, workspace_image) == as_restored(expected)
    await docker.networks.get(f"{docker_prefix}-restore")  # there again


class _EngineElsewhere(BridgeNetwork):
    """Fault: the engine is on another host, so the network's address is not this one's."""

    async def own_address(self) -> str:
        return "192.0.2.1"  # TEST-NET-1: never a local address


async def test_tar_restore_with_a_remote_engine_is_a_permanent_error_naming_the_setting(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        docker_prefix: str) -> None:
    volume = await storage.provision("w1")
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    remote = DockerVolumeStorage(
        docker=docker, objects=objects, helper_image="unused:never",
        volume_prefix=f"{docker_prefix}-home-",
        restore_network=_EngineElsewhere(docker, f"{docker_prefix}-restore"))
    with pytest.raises(PermanentError, match=r"restore_with = put-archive"):
        await remote.restore("w1", info.key, info.sha256)
    assert await our_leftovers(docker, docker_prefix) == ([], [])


class _UnreachableFromTheNetwork(BridgeNetwork):
    """Fault: an address this process can listen on that the helper cannot reach (inside the
    helper's own network namespace, 127.0.0.1 is the helper itself)."""

    async def own_address(self) -> str:
        await self.ensure()
        return "127.0.0.1"


async def test_tar_helper_that_cannot_connect_fails_with_its_own_words_and_leaves_nothing(
        storage: DockerVolumeStorage, objects: S3ObjectStore, docker: aiodocker.Docker,
        workspace_image: str, docker_prefix: str) -> None:
    volume = await storage.provision("w1")
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    cut_off = DockerVolumeStorage(
        docker=docker, objects=objects, helper_image=workspace_image,
        volume_prefix=f"{docker_prefix}-home-",
        restore_network=_UnreachableFromTheNetwork(docker, f"{docker_prefix}-restore"))
    with pytest.raises(AdapterError, match="finished before it connected") as caught:
        await cut_off.restore("w1", info.key, info.sha256)
    assert "Connection refused" in str(caught.value)  # bash's words, from the helper's log
    assert "put-archive" in str(caught.value)
    assert await our_leftovers(docker, docker_prefix) == ([], [])
