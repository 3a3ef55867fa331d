"""Every failpoint of the storage adapter really kills the process, and running the same
operation again afterwards ends with exactly the data one clean run gives.

The operation runs in a child Python process with CODEHUB_FAILPOINT set; the child must
die by SIGKILL. The re-run happens in this process, against the same Docker engine and S3.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiodocker
import pytest
from storage_support import (
    as_restored,
    fill_volume,
    manifest,
    our_leftovers,
)

import codehub.backends.docker.volumes as volumes_module
import codehub.storage.codec as codec_module
from codehub.backends.docker.volumes import DockerVolumeStorage
from codehub.backends.objects import S3ObjectStore
from codehub.failpoints import ENV

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]

ARCHIVE_POINTS = ["archive.after_stream_start", "archive.after_upload", "archive.after_verify"]
RESTORE_POINTS = ["restore.after_download_start", "restore.after_extract",
                  "restore.before_return"]
DELETE_POINTS = ["delete_volume.before_delete"]

CHILD = r"""
import asyncio, json, sys
import aiodocker
from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.objects import S3ObjectStore
from codehub.backends.docker.volumes import DockerVolumeStorage

args = json.loads(sys.argv[1])

async def main():
    async with aiodocker.Docker(url=args["docker_url"]) as docker, \
            S3ObjectStore(**args["s3"]) as objects:
        storage = DockerVolumeStorage(docker=docker, objects=objects,
                                      helper_image=args["image"],
                                      volume_prefix=args["volume_prefix"],
                                      restore_network=BridgeNetwork(docker, args["network"]))
        if args["op"] == "archive":
            await storage.archive("w1", args["volume"])
        elif args["op"] == "restore":
            await storage.restore("w1", args["key"], args["sha256"])
        else:
            await storage.delete_volume("w1", args["volume"])
    print("survived")

asyncio.run(main())
"""


async def run_child(point: str | None, args: dict[str, Any]) -> tuple[int, str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    if point is not None:
        env[ENV] = point
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, json.dumps(args), env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=180)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


@pytest.fixture
def child_args(docker_engine: Any, s3_settings: dict[str, str], workspace_image: str,
               docker_prefix: str) -> dict[str, Any]:
    return {"docker_url": docker_engine.url, "image": workspace_image,
            "volume_prefix": f"{docker_prefix}-home-", "s3": s3_settings,
            "network": f"{docker_prefix}-restore"}


async def filled_volume(storage: DockerVolumeStorage, docker: aiodocker.Docker, image: str,
                        tmp_path: Path) -> tuple[str, Any]:
    volume = await storage.provision("w1")
    await fill_volume(docker, volume, image, tmp_path, big_bytes=3 * MiB, small_files=50)
    return volume, await manifest(docker, volume, image)


def test_every_failpoint_in_the_code_is_listed_in_the_docstring_and_tested() -> None:
    # Archive and restore run across codehub/backends/docker/ and the byte code of
    # codehub/storage/; volumes.py lists every point.
    source = "".join(path.read_text()
                     for folder in (Path(volumes_module.__file__).parent,
                                    Path(codec_module.__file__).parent)
                     for path in sorted(folder.glob("*.py")))
    in_code = set(re.findall(r'failpoint\("([a-z_.]+)"\)', source))
    in_doc = set(re.findall(r"`((?:archive|restore|delete_volume)\.[a-z_]+)`",
                            volumes_module.__doc__ or ""))
    tested = set(ARCHIVE_POINTS + RESTORE_POINTS + DELETE_POINTS)
    assert in_code == in_doc == tested


async def test_an_armed_failpoint_kills_with_sigkill_and_an_unarmed_one_is_a_no_op() -> None:
    code = ("from codehub.failpoints import failpoint, arm\n"
            "failpoint('x.unarmed'); print('passed', flush=True)\n"
            "arm('x.late'); failpoint('x.armed'); print('still alive', flush=True)\n"
            "failpoint('x.late'); print('unreachable', flush=True)\n")
    for env_value, expected_out in (("x.armed", ["passed"]), ("", ["passed", "still alive"])):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, env={ENV: env_value, "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert out.decode().split() == " ".join(expected_out).split()


@pytest.mark.parametrize("point", ARCHIVE_POINTS)
async def test_archive_killed_at_failpoint_then_rerun_archives_identical_data(
        point: str, storage: DockerVolumeStorage, objects: S3ObjectStore,
        docker: aiodocker.Docker, workspace_image: str, docker_prefix: str,
        child_args: dict[str, Any], tmp_path: Path) -> None:
    volume, expected = await filled_volume(storage, docker, workspace_image, tmp_path)
    code, out = await run_child(point, {**child_args, "op": "archive", "volume": volume})
    assert code == -signal.SIGKILL, out
    assert await manifest(docker, volume, workspace_image) == expected  # nothing deleted
    if point == "archive.after_stream_start":
        assert await objects.head("w1/home.tar.gz") is None  # nothing looks complete

    info = await storage.archive("w1", volume)
    assert await manifest(docker, volume, workspace_image) == expected
    uploads = await objects.client.list_multipart_uploads(Bucket=objects.bucket)
    assert not uploads.get("Uploads")
    await storage.delete_volume("w1", volume)
    restored = await storage.restore("w1", info.key, info.sha256)
    assert await manifest(docker, restored, workspace_image) == as_restored(expected)
    assert await our_leftovers(docker, docker_prefix) == ([restored], [])


@pytest.mark.parametrize("point", RESTORE_POINTS)
async def test_restore_killed_at_failpoint_then_rerun_restores_identical_data(
        point: str, storage: DockerVolumeStorage, objects: S3ObjectStore,
        docker: aiodocker.Docker, workspace_image: str, docker_prefix: str,
        child_args: dict[str, Any], tmp_path: Path) -> None:
    volume, expected = await filled_volume(storage, docker, workspace_image, tmp_path)
    info = await storage.archive("w1", volume)
    await storage.delete_volume("w1", volume)
    archived = await objects.head(info.key)

    code, out = await run_child(point, {**child_args, "op": "restore", "key": info.key,
                                        "sha256": info.sha256})
    assert code == -signal.SIGKILL, out
    assert await objects.head(info.key) == archived  # the archive is never touched
    half_made, _ = await our_leftovers(docker, docker_prefix)
    assert half_made == [storage.restored_volume_name("w1", info.sha256)]

    restored = await storage.restore("w1", info.key, info.sha256)
    assert restored == half_made[0]
    assert await manifest(docker, restored, workspace_image) == as_restored(expected)
    assert await objects.head(info.key) == archived
    assert await our_leftovers(docker, docker_prefix) == ([restored], [])


@pytest.mark.parametrize("point", DELETE_POINTS)
async def test_volume_delete_killed_at_failpoint_then_rerun_deletes_and_the_archive_restores(
        point: str, storage: DockerVolumeStorage, objects: S3ObjectStore,
        docker: aiodocker.Docker, workspace_image: str, docker_prefix: str,
        child_args: dict[str, Any], tmp_path: Path) -> None:
    volume, expected = await filled_volume(storage, docker, workspace_image, tmp_path)
    info = await storage.archive("w1", volume)
    # A helper that a killed archive left behind pins the volume until the delete removes it.
    await storage.helpers.create(volume, "w1", "archiver", read_only=True)

    code, out = await run_child(point, {**child_args, "op": "delete_volume", "volume": volume})
    assert code == -signal.SIGKILL, out
    assert await manifest(docker, volume, workspace_image) == expected

    await storage.delete_volume("w1", volume)
    assert await our_leftovers(docker, docker_prefix) == ([], [])
    restored = await storage.restore("w1", info.key, info.sha256)
    assert await manifest(docker, restored, workspace_image) == as_restored(expected)


async def test_child_runs_to_completion_when_no_failpoint_is_armed(
        storage: DockerVolumeStorage, docker: aiodocker.Docker, workspace_image: str,
        child_args: dict[str, Any], tmp_path: Path) -> None:
    """The harness itself: without a failpoint the same child finishes normally."""
    volume, _ = await filled_volume(storage, docker, workspace_image, tmp_path)
    code, out = await run_child(None, {**child_args, "op": "archive", "volume": volume})
    assert code == 0, out
    assert "survived" in out
