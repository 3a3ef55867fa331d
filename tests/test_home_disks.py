"""Size-limited homes (codehub/backends/docker/disks.py) on the real engine: each home its own ext4
file system, loop-mounted nosuid,nodev, seen by the workspace as /home/coder. Each test is
named after a guarantee of disks.py or of the volume storage that uses it."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiodocker
import pytest
from isolation_support import exec_in
from storage_support import put_tar

from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.docker.disks import DiskLayout, HomeDisks
from codehub.backends.docker.sandbox import Sandbox
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import S3ObjectStore
from codehub.interfaces import PermanentError
from codehub.storage.tarfilter import HomeTooLarge

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20
LIMIT = 64 * MiB


def _unmount_under(root: Path) -> None:
    with open("/proc/mounts") as mounts:
        targets = [line.split()[1] for line in mounts if line.split()[1].startswith(str(root))]
    for target in sorted(targets, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@pytest.fixture
def layout(tmp_path: Path) -> Iterator[DiskLayout]:
    made = DiskLayout(image_dir=str(tmp_path / "images"), mount_dir=str(tmp_path / "mnt"))
    try:
        yield made
    finally:
        _unmount_under(tmp_path / "mnt")


@pytest.fixture
def storage(docker: aiodocker.Docker, objects: S3ObjectStore, workspace_image: str,
            docker_prefix: str, layout: DiskLayout) -> DockerVolumeStorage:
    disks = HomeDisks(docker, helper_image=workspace_image, layout=layout, local=True)
    return DockerVolumeStorage(docker=docker, objects=objects, helper_image=workspace_image,
                               volume_prefix=f"{docker_prefix}-home-", home_size_limit=LIMIT,
                               disks=disks)


@pytest.fixture
async def controller(docker: aiodocker.Docker, docker_prefix: str,
                     storage: DockerVolumeStorage) -> AsyncIterator[DockerInstanceController]:
    ctl = DockerInstanceController(docker=docker, network=f"{docker_prefix}-net",
                                   name_prefix=f"{docker_prefix}-ws-",
                                   sandbox=Sandbox(memory_limit_bytes=256 * MiB),
                                   start_timeout=60, prepare_volume=storage.ensure_home)
    try:
        yield ctl
    finally:
        await ctl.close()


async def sh(docker: aiodocker.Docker, container: str, script: str, user: str = ""
             ) -> tuple[int, str]:
    return await exec_in(docker, container, ["sh", "-c", script], user=user)


async def test_a_home_is_its_own_file_system_and_writing_past_its_size_fails_with_enospc(
        storage: DockerVolumeStorage, controller: DockerInstanceController,
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str,
        layout: DiskLayout) -> None:
    for ws in ("a", "b"):
        await controller.start(ws, workspace_image, await storage.provision(ws))
    a, b = f"{docker_prefix}-ws-a", f"{docker_prefix}-ws-b"
    info = await (await docker.volumes.get(f"{docker_prefix}-home-a")).show()
    assert info["Options"] == {"type": "none", "o": "bind",
                               "device": f"{layout.mount_dir}/{docker_prefix}-home-a"}
    code, out = await sh(docker, a, "grep ' /home/coder ' /proc/mounts; stat -c '%u:%g' "
                                    "/home/coder; ls -A /home/coder")
    assert code == 0, out
    fields = out.split()
    assert fields[2] == "ext4" and "nosuid" in fields[3] and "nodev" in fields[3], out
    assert fields[6] == "1000:1000" and "lost+found" not in fields, out
    image = Path(layout.image_dir) / f"{docker_prefix}-home-a.img"
    assert (await asyncio.to_thread(os.stat, image)).st_size == LIMIT
    code, out = await sh(docker, a, "dd if=/dev/zero of=/home/coder/fill bs=1M count=100 "
                                    "2>&1; echo rc=$?", user="1000:1000")
    assert "No space left on device" in out and "rc=1" in out, out
    # The image is sparse (costs what it holds), and the other home still has its space.
    assert (await asyncio.to_thread(os.stat, image)).st_blocks * 512 <= LIMIT + 4 * MiB
    code, out = await sh(docker, b, "dd if=/dev/zero of=/home/coder/f bs=1M count=32 "
                                    "2>&1; echo rc=$?", user="1000:1000")
    assert "rc=0" in out, out


async def test_setuid_files_and_device_nodes_in_a_home_grant_nothing(
        storage: DockerVolumeStorage, controller: DockerInstanceController,
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str) -> None:
    """Put there by root through Docker's archive API (what no workspace user can do):
    a root-owned 4755 copy of `id` and /dev/mem's device node."""
    volume = await storage.provision("a")
    id_binary = await asyncio.to_thread(Path("/usr/bin/id").read_bytes)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        top = tarfile.TarInfo("coder")
        top.type, top.mode, top.uid, top.gid = tarfile.DIRTYPE, 0o755, 1000, 1000
        tf.addfile(top)
        suid = tarfile.TarInfo("coder/id-suid")
        suid.size, suid.mode, suid.uid, suid.gid = len(id_binary), 0o4755, 0, 0
        tf.addfile(suid, io.BytesIO(id_binary))
        mem = tarfile.TarInfo("coder/mem")
        mem.type, mem.devmajor, mem.devminor, mem.mode = tarfile.CHRTYPE, 1, 1, 0o666
        tf.addfile(mem)
    buf.seek(0)
    await put_tar(docker, volume, workspace_image, buf)
    await controller.start("a", workspace_image, volume)
    name = f"{docker_prefix}-ws-a"
    code, out = await sh(docker, name, "ls -l /home/coder/id-suid /home/coder/mem; "
                                       "/home/coder/id-suid -u", user="1000:1000")
    assert code == 0, out
    assert "-rwsr-xr-x" in out and out.strip().endswith("1000"), out  # not 0
    for user in ("1000:1000", "0"):
        code, out = await sh(docker, name, "head -c 1 /home/coder/mem >/dev/null", user=user)
        assert code != 0 and ("Permission denied" in out or "not permitted" in out), out


async def test_an_unmounted_home_is_mounted_again_and_a_lost_image_never_gives_an_empty_home(
        storage: DockerVolumeStorage, controller: DockerInstanceController,
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str,
        layout: DiskLayout) -> None:
    volume = await storage.provision("a")
    await controller.start("a", workspace_image, volume)
    name = f"{docker_prefix}-ws-a"
    assert (await sh(docker, name, "echo kept > /home/coder/f", user="1000:1000"))[0] == 0
    await controller.stop("a")
    mount_point = Path(layout.mount_dir) / volume
    subprocess.run(["umount", str(mount_point)], check=True)  # as after a reboot
    await controller.start("a", workspace_image, volume)
    assert (await sh(docker, name, "cat /home/coder/f"))[1] == "kept\n"
    await controller.stop("a")
    subprocess.run(["umount", str(mount_point)], check=True)
    image = Path(layout.image_dir) / f"{volume}.img"
    await asyncio.to_thread(image.rename, image.with_suffix(".gone"))
    with pytest.raises(PermanentError, match="missing"):
        await controller.start("a", workspace_image, volume)
    assert (await controller.get_status("a")).state.value == "MISSING"


async def test_archive_restore_and_delete_of_a_size_limited_home(
        storage: DockerVolumeStorage, controller: DockerInstanceController,
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str,
        layout: DiskLayout, objects: S3ObjectStore) -> None:
    volume = await storage.provision("a")
    await controller.start("a", workspace_image, volume)
    name = f"{docker_prefix}-ws-a"
    code, out = await sh(docker, name, "echo mine > /home/coder/work.txt && "
                                       "truncate -s 200M /home/coder/sparse && du -k "
                                       "/home/coder/sparse", user="1000:1000")
    assert code == 0 and int(out.split()[0]) < 1024, out  # a sparse file in a 64 MiB home
    await controller.stop("a")
    info = await storage.archive("a", volume)
    # Sparse files are counted at their apparent size: written out, this one does not fit.
    with pytest.raises(HomeTooLarge, match="size limit"):
        await storage.restore("a", info.key, info.sha256)
    assert await objects.head(info.key) is not None
    await storage.delete_volume("a", volume)
    assert not (Path(layout.image_dir) / f"{volume}.img").exists()
    assert not (Path(layout.mount_dir) / volume).exists()
    # Without the sparse file the home comes back, as a size-limited home of its own.
    again = await storage.provision("a")
    await controller.start("a", workspace_image, again)
    assert (await sh(docker, name, "echo mine > /home/coder/work.txt",
                     user="1000:1000"))[0] == 0
    await controller.stop("a")
    info = await storage.archive("a", again)
    restored = await storage.restore("a", info.key, info.sha256)
    assert (Path(layout.image_dir) / f"{restored}.img").exists()
    await controller.start("a", workspace_image, restored)
    assert (await sh(docker, name, "cat /home/coder/work.txt; df -k /home/coder | tail -1"
                     ))[1].startswith("mine\n")
    leftovers = [v["Name"] for v in (await docker.volumes.list())["Volumes"] or []
                 if docker_prefix in v["Name"]]
    assert sorted(leftovers) == sorted([again, restored])


async def test_the_helper_path_makes_mounts_and_removes_a_home_in_the_hosts_namespace(
        docker: aiodocker.Docker, workspace_image: str, docker_prefix: str,
        layout: DiskLayout) -> None:
    """The gateway in a container has no mount namespace of the host's: a privileged helper
    enters it (nsenter) and the file system appears on the host as from the gateway."""
    disks = HomeDisks(docker, helper_image=workspace_image, layout=layout, local=False)
    volume = f"{docker_prefix}-home-h"
    await disks.create(volume, LIMIT, (1000, 1000))
    await disks.create(volume, LIMIT, (1000, 1000))  # idempotent
    mount_point = Path(disks.mount_point(volume))
    found = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(mount_point)],
                           capture_output=True, text=True).stdout
    assert found.startswith("ext4") and "nosuid" in found and "nodev" in found, found
    assert (await asyncio.to_thread(os.stat, mount_point)).st_uid == 1000
    subprocess.run(["umount", str(mount_point)], check=True)
    await disks.ensure_mounted(volume)
    assert subprocess.run(["mountpoint", "-q", str(mount_point)]).returncode == 0
    await disks.remove(volume)
    await disks.remove(volume)
    assert not await asyncio.to_thread(mount_point.exists)
    assert not await asyncio.to_thread((Path(layout.image_dir) / f"{volume}.img").exists)
    with pytest.raises(PermanentError, match="missing"):
        await disks.ensure_mounted(volume)
    left = await docker.containers.list(all=True)
    assert not [c for c in left if any(volume in n for n in c["Names"])]


async def test_a_workspaces_own_size_makes_its_home_that_size(
        storage: DockerVolumeStorage, layout: DiskLayout, docker_prefix: str) -> None:
    volume = await storage.provision("own", size_limit=32 * MiB)
    image = Path(layout.image_dir) / f"{volume}.img"
    assert (await asyncio.to_thread(os.stat, image)).st_size == 32 * MiB
    default = await storage.provision("dflt")
    image = Path(layout.image_dir) / f"{default}.img"
    assert (await asyncio.to_thread(os.stat, image)).st_size == LIMIT
