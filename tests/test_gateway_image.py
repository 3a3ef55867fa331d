"""The single-container deployment: the Dockerfile builds here without a registry, and the
gateway restores an archive from inside its container, run with --network host as the
README says: it installs the restore network's firewall and the tar helper connects back
to it through it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.services import DockerEngine

ROOT = Path(__file__).resolve().parent.parent

# Runs inside the gateway's container: archive a small volume and restore it with the
# default tar helper, whose connection must reach this container on the restore network.
IN_CONTAINER = r"""
import asyncio, io, json, sys, tarfile
import aiodocker
from codehub.backends.docker.firewall import Firewall
from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.objects import LocalObjectStore
from codehub.backends.docker.volumes import DockerVolumeStorage

args = json.loads(sys.argv[1])

async def main():
    async with aiodocker.Docker(url="unix:///var/run/docker.sock") as docker:
        objects = LocalObjectStore("/tmp/objects")
        await objects.open()
        network = BridgeNetwork(docker, args["network"], gateway_container=args["me"],
                                firewall=Firewall(), host_tcp=True)
        storage = DockerVolumeStorage(docker=docker, objects=objects,
                                      helper_image=args["helper_image"],
                                      volume_prefix=args["volume_prefix"],
                                      restore_network=network)
        volume = await storage.provision("w1")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, data in (("coder/hello.txt", b"hello from the container\n"),):
                info = tarfile.TarInfo(name)
                info.size, info.uid, info.gid = len(data), 1000, 1000
                tf.addfile(info, io.BytesIO(data))
        helper = await storage.helpers.create(volume, "w1", "filler", read_only=False)
        await docker.containers.container(helper).put_archive("/home", buf.getvalue())
        await storage.helpers.remove(helper)
        archived = await storage.archive("w1", volume)
        restored = await storage.restore("w1", archived.key, archived.sha256)
        print(json.dumps({"restored": restored}))
        await objects.close()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def gateway_image(docker_engine: DockerEngine) -> Iterator[str]:
    tag = "codehub-gateway-test:image-test"
    try:
        proc = subprocess.run([str(ROOT / "scripts" / "build-gateway-image"), tag],
                              capture_output=True, text=True, timeout=900,
                              env=docker_engine.env())
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proc.stdout.strip().splitlines()[-1] == tag
        yield tag
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60,
                       env=docker_engine.env())


def test_dockerfile_builds_from_a_local_base_and_codehub_runs_inside(
        docker_engine: DockerEngine, gateway_image: str) -> None:
    out = subprocess.run(["docker", "run", "--rm", gateway_image, "config", "show"],
                         capture_output=True, text=True, timeout=120, env=docker_engine.env())
    assert out.returncode == 0, out.stderr
    assert '"data_dir": "/data"' in out.stdout and '"host": "0.0.0.0"' in out.stdout
    version = subprocess.run(["docker", "run", "--rm", "--entrypoint", "python3", gateway_image,
                              "-c", "import codehub.app, uvloop, isal; "
                              "from codehub.gateway.pages import PACKAGE_STATIC as s; "
                              "assert (s / 'loading.html').is_file(); print('ok')"],
                             capture_output=True, text=True, timeout=120,
                             env=docker_engine.env())
    assert version.stdout.strip() == "ok", version.stderr


def test_a_gateway_in_a_container_restores_through_the_tar_helper(
        docker_engine: DockerEngine, gateway_image: str, workspace_image: str,
        docker_prefix: str) -> None:
    if not docker_engine.url.startswith("unix://"):
        pytest.skip("the gateway's container mounts the engine's socket")
    socket_path = docker_engine.url.removeprefix("unix://")
    me = f"{docker_prefix}-gateway"
    args = {"network": f"{docker_prefix}-restore", "me": me,
            "helper_image": workspace_image, "volume_prefix": f"{docker_prefix}-home-"}
    proc = subprocess.run(
        ["docker", "run", "--rm", "--name", me, "--network", "host", "--cap-add", "NET_ADMIN",
         "-v", f"{socket_path}:/var/run/docker.sock",
         "--entrypoint", "python3", gateway_image, "-c", IN_CONTAINER, json.dumps(args)],
        capture_output=True, text=True, timeout=300, env=docker_engine.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    restored = json.loads(proc.stdout.strip().splitlines()[-1])["restored"]
    assert restored.startswith(f"{docker_prefix}-home-w1-r")
    shown = subprocess.run(
        ["docker", "run", "--rm", "-v", f"{restored}:/home/coder", "--entrypoint", "cat",
         workspace_image, "/home/coder/hello.txt"],
        capture_output=True, text=True, timeout=120, env=docker_engine.env())
    assert shown.stdout == "hello from the container\n", shown.stderr
