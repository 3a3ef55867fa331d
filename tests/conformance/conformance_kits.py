"""What the conformance checks need of a backend besides its interface: a kit per
implementation. A kit holds the object under test and does, on the real thing, what a
user or an operator would do behind its back (write files into a home, kill a container,
overwrite an object's bytes), so the checks stay written against the interfaces only.

Kits for the Docker, S3 (moto) and local-directory adapters use the session's real
services (tests/conftest.py, tests/storage_support.py); the in-memory kits need none.
"""

from __future__ import annotations

import hashlib
import io
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import aiodocker
from storage_support import make_storage, manifest, put_tar

from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.memory import (
    MemoryInstanceController,
    MemoryObjectStore,
    MemoryStorageProvider,
    MemoryVolume,
)
from codehub.backends.memory.storage import home_tar
from codehub.backends.objects import LocalObjectStore, S3ObjectStore
from codehub.interfaces import InstanceController, ObjectStore, StorageProvider

MISSING_IMAGE = "codehub-conformance/no-such-image:never"
Files = dict[str, bytes]  # path below the home -> contents


def digests(files: Files) -> dict[str, str]:
    """What a home is compared by: each regular file's sha256."""
    return {path: hashlib.sha256(data).hexdigest() for path, data in files.items()}


# --- InstanceController -------------------------------------------------------------------


class InstanceKit(ABC):
    controller: InstanceController
    image: str  # an image that exists and becomes healthy
    missing_image = MISSING_IMAGE

    @abstractmethod
    async def make_volume(self, workspace_id: str) -> str:
        """A home volume the controller may start the workspace on."""

    @abstractmethod
    async def volume_exists(self, name: str) -> bool: ...

    @abstractmethod
    async def instance_token(self, workspace_id: str) -> str | None:
        """Identifies the workspace's instance (a new one gets a new token); None: none."""

    @abstractmethod
    async def kill(self, workspace_id: str) -> None:
        """The instance's process dies behind the controller's back (SIGKILL)."""

    @abstractmethod
    def released(self) -> bool:
        """The controller holds nothing it opened (what leaving `async with` must do)."""


class DockerInstanceKit(InstanceKit):
    def __init__(self, docker: aiodocker.Docker, prefix: str, image: str) -> None:
        self.docker = docker
        self.prefix = prefix
        self.image = image
        self.controller = DockerInstanceController(
            docker=docker, network=f"{prefix}-net", name_prefix=f"{prefix}-ws-",
            memory_limit_bytes=256 << 20, start_timeout=30.0)

    async def make_volume(self, workspace_id: str) -> str:
        name = f"{self.prefix}-home-{workspace_id}"
        await self.docker.volumes.create({"Name": name})
        return name

    async def volume_exists(self, name: str) -> bool:
        vols = (await self.docker.volumes.list()).get("Volumes") or []
        return any(v["Name"] == name for v in vols)

    async def instance_token(self, workspace_id: str) -> str | None:
        try:
            container = await self.docker.containers.get(f"{self.prefix}-ws-{workspace_id}")
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return None
            raise
        return str(container._container["Id"])

    async def kill(self, workspace_id: str) -> None:
        name = f"{self.prefix}-ws-{workspace_id}"
        await self.docker.containers.container(name).kill()
        await self.docker.containers.container(name).wait()

    def released(self) -> bool:
        assert isinstance(self.controller, DockerInstanceController)
        return self.controller._session is None

    async def close(self) -> None:
        assert isinstance(self.controller, DockerInstanceController)
        await self.controller.close()


class MemoryInstanceKit(InstanceKit):
    image = "codehub-conformance/echo:memory"

    def __init__(self, controller_class: type[MemoryInstanceController] = MemoryInstanceController
                 ) -> None:
        self.storage = MemoryStorageProvider(MemoryObjectStore())
        self.memory = controller_class(self.storage, images={self.image})
        self.controller = self.memory

    async def make_volume(self, workspace_id: str) -> str:
        return await self.storage.provision(workspace_id)

    async def volume_exists(self, name: str) -> bool:
        return name in self.storage.volumes

    async def instance_token(self, workspace_id: str) -> str | None:
        found = self.memory.instances.get(workspace_id)
        return None if found is None else str(found.number)

    async def kill(self, workspace_id: str) -> None:
        self.memory.fail(workspace_id, 137)

    def released(self) -> bool:
        return not self.memory.is_open

    async def close(self) -> None:
        return None


# --- StorageProvider ----------------------------------------------------------------------


class StorageKit(ABC):
    objects: ObjectStore  # the store the provider archives to

    @abstractmethod
    def storage(self, objects: ObjectStore | None = None) -> StorageProvider:
        """The provider under test on `objects` (default: the kit's own store): a check may
        pass one wrapped to inject a fault."""

    @abstractmethod
    async def write(self, home_store_key: str, files: Files) -> None:
        """The workspace's user writes `files` (paths below the home) into the volume."""

    @abstractmethod
    async def read(self, home_store_key: str) -> dict[str, str]:
        """The home's regular files, as `digests()` gives them."""

    @abstractmethod
    async def add_foreign_volume(self, name: str) -> None:
        """A volume of that name made by someone else, without CodeHub's labels."""

    def released(self, storage: StorageProvider) -> bool:
        """`storage` holds nothing it opened (what leaving `async with` must do)."""
        return True  # a provider that opens nothing of its own

    def volume_name(self, workspace_id: str) -> str:
        """The name `provision()` is expected to give (ownership checks need it)."""
        return f"{self.prefix}{workspace_id}"

    prefix: str


class DockerStorageKit(StorageKit):
    def __init__(self, docker: aiodocker.Docker, objects: S3ObjectStore, prefix: str,
                 image: str) -> None:
        self.docker = docker
        self.objects = objects
        self.docker_prefix = prefix
        self.prefix = f"{prefix}-home-"
        self.image = image

    def storage(self, objects: ObjectStore | None = None) -> StorageProvider:
        return make_storage(self.docker, objects or self.objects,  # type: ignore[arg-type]
                            self.docker_prefix, self.image)

    async def write(self, home_store_key: str, files: Files) -> None:
        await put_tar(self.docker, home_store_key, self.image, io.BytesIO(home_tar(files)))

    async def read(self, home_store_key: str) -> dict[str, str]:
        entries = await manifest(self.docker, home_store_key, self.image)
        return {name.removeprefix("coder/"): entry[6] for name, entry in entries.items()
                if entry[0] == "file"}

    async def add_foreign_volume(self, name: str) -> None:
        await self.docker.volumes.create({"Name": name})


class MemoryStorageKit(StorageKit):
    prefix = "codehub-home-"

    def __init__(self, storage_class: type[MemoryStorageProvider] = MemoryStorageProvider
                 ) -> None:
        self.objects = MemoryObjectStore()
        self._class = storage_class
        self.world: dict[str, MemoryVolume] = {}  # the volumes every provider made sees

    def storage(self, objects: ObjectStore | None = None) -> StorageProvider:
        made = self._class(objects or self.objects, volume_prefix=self.prefix)
        made.volumes = self.world
        return made

    async def write(self, home_store_key: str, files: Files) -> None:
        self.world[home_store_key].files.update(files)

    async def read(self, home_store_key: str) -> dict[str, str]:
        return digests(self.world[home_store_key].files)

    async def add_foreign_volume(self, name: str) -> None:
        self.world[name] = MemoryVolume(name, {})

    def released(self, storage: StorageProvider) -> bool:
        assert isinstance(storage, MemoryStorageProvider)
        return not storage.is_open


# --- ObjectStore --------------------------------------------------------------------------


class ObjectKit(ABC):
    store: ObjectStore

    @abstractmethod
    async def overwrite_bytes(self, key: str, data: bytes) -> None:
        """Replace the stored object's bytes behind the store's back (its meta stays)."""

    def released(self) -> bool:
        """The store holds nothing it opened (what leaving `async with` must do)."""
        return True  # a store that opens nothing it must release (a local directory)


class S3ObjectKit(ObjectKit):
    def __init__(self, store: S3ObjectStore) -> None:
        self.store = store

    async def overwrite_bytes(self, key: str, data: bytes) -> None:
        assert isinstance(self.store, S3ObjectStore)
        await self.store.client.put_object(Bucket=self.store.bucket, Key=key, Body=data)

    def released(self) -> bool:
        assert isinstance(self.store, S3ObjectStore)
        return self.store._client is None


class LocalObjectKit(ObjectKit):
    def __init__(self, root: Path) -> None:
        self.store = LocalObjectStore(root)

    async def overwrite_bytes(self, key: str, data: bytes) -> None:
        assert isinstance(self.store, LocalObjectStore)
        self.store.path_of(key).write_bytes(data)


class MemoryObjectKit(ObjectKit):
    def __init__(self, store_class: Callable[[], MemoryObjectStore] = MemoryObjectStore
                 ) -> None:
        self.memory = store_class()
        self.store = self.memory

    async def overwrite_bytes(self, key: str, data: bytes) -> None:
        self.memory.objects[key] = data

    def released(self) -> bool:
        return not self.memory.is_open
