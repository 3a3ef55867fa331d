"""Fixtures of the conformance suite: one kit per implementation of each interface.

`instance_kit`: the Docker InstanceController (real engine, the echo workspace image) and
the in-memory one. `storage_kit`: Docker volumes archiving to S3 (moto) and the in-memory
provider on the in-memory store. `object_kit`: S3 (moto), a local directory and memory.
The real kits start their services on first use only, so `-k memory` needs none.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiodocker
import pytest

pytest.register_assert_rewrite("instance_checks", "storage_checks", "object_checks")

from conformance_kits import (  # noqa: E402
    DockerInstanceKit,
    DockerStorageKit,
    InstanceKit,
    LocalObjectKit,
    MemoryInstanceKit,
    MemoryObjectKit,
    MemoryStorageKit,
    ObjectKit,
    S3ObjectKit,
    StorageKit,
)
from storage_support import s3_objects  # noqa: E402


def _docker(request: pytest.FixtureRequest) -> tuple[aiodocker.Docker, str, str]:
    engine = request.getfixturevalue("docker_engine")
    prefix = request.getfixturevalue("docker_prefix")
    image = request.getfixturevalue("workspace_image")
    return aiodocker.Docker(url=engine.url), prefix, image


@pytest.fixture(params=["docker", "memory"])
async def instance_kit(request: pytest.FixtureRequest) -> AsyncIterator[InstanceKit]:
    if request.param == "memory":
        yield MemoryInstanceKit()
        return
    docker, prefix, image = _docker(request)
    kit = DockerInstanceKit(docker, prefix, image)
    try:
        yield kit
    finally:
        await kit.close()
        await docker.close()


@pytest.fixture(params=["docker-s3", "memory"])
async def storage_kit(request: pytest.FixtureRequest) -> AsyncIterator[StorageKit]:
    if request.param == "memory":
        yield MemoryStorageKit()
        return
    docker, prefix, image = _docker(request)
    try:
        async with s3_objects(request.getfixturevalue("s3_settings")) as objects:
            yield DockerStorageKit(docker, objects, prefix, image)
    finally:
        await docker.close()


@pytest.fixture(params=["s3", "local", "memory"])
async def object_kit(request: pytest.FixtureRequest, tmp_path: Path
                     ) -> AsyncIterator[ObjectKit]:
    if request.param == "memory":
        yield MemoryObjectKit()
    elif request.param == "local":
        kit = LocalObjectKit(tmp_path / "objects")
        await kit.store.open()
        yield kit
    else:
        async with s3_objects(request.getfixturevalue("s3_settings")) as objects:
            yield S3ObjectKit(objects)
