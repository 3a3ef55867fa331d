"""The conformance suite catches a broken backend: each deliberately broken implementation
below breaks one guarantee, and the check named after that guarantee fails against it
(while it passes against the unbroken in-memory implementation, in the same test)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import instance_checks
import object_checks
import pytest
import storage_checks
from conformance_kits import MemoryInstanceKit, MemoryObjectKit, MemoryStorageKit

from codehub.backends.memory import (
    MemoryInstance,
    MemoryInstanceController,
    MemoryObjectStore,
    MemoryStorageProvider,
    MemoryVolume,
)
from codehub.constants import ARCHIVE_FORMAT
from codehub.interfaces import (
    AdapterError,
    ArchiveInfo,
    ManagedResource,
    ObjectMeta,
    ProgressCallback,
)
from codehub.model import InstanceState, VolumeState

FAILED = (AssertionError, pytest.fail.Exception)


# --- broken InstanceControllers -----------------------------------------------------------


class StopNotIdempotent(MemoryInstanceController):
    async def stop(self, workspace_id: str) -> None:
        if workspace_id not in self.instances:
            raise AdapterError(f"no container for {workspace_id}")
        await super().stop(workspace_id)


class StartAlwaysReplaces(MemoryInstanceController):
    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        self.instances.pop(workspace_id, None)
        await super().start(workspace_id, image_ref, volume_name)


class StartIgnoresTheVolume(MemoryInstanceController):
    """Reuses a running instance whatever volume it was asked for."""

    @staticmethod
    def _reusable(current: MemoryInstance | None, image_ref: str, volume_name: str) -> bool:
        return current is not None and current.state is InstanceState.RUNNING


class StartMakesMissingVolumes(MemoryInstanceController):
    """Docker's default: a missing volume is made, blank."""

    async def start(self, workspace_id: str, image_ref: str, volume_name: str) -> None:
        assert self._storage is not None
        self._storage.volumes.setdefault(volume_name, MemoryVolume(volume_name, {}))
        await super().start(workspace_id, image_ref, volume_name)


# --- broken StorageProviders --------------------------------------------------------------


class RestoreDeletesTheArchive(MemoryStorageProvider):
    async def restore(self, workspace_id: str, archive_key: str, expected_sha256: str,
                      progress: ProgressCallback | None = None,
                      size_limit: int | None = None) -> str:
        name = await super().restore(workspace_id, archive_key, expected_sha256, progress,
                                     size_limit)
        await self.objects.delete(archive_key)
        return name


class RestoreTrustsTheMeta(MemoryStorageProvider):
    """Checks the meta's sha256 but never the bytes it reads."""

    async def _read_verified(self, key: str, size: int, expected: str,
                             progress: ProgressCallback | None) -> bytes:
        return b"".join([chunk async for chunk in self.objects.get_stream(key)])


class ArchiveDeletesTheVolume(MemoryStorageProvider):
    async def archive(self, workspace_id: str, home_store_key: str,
                      progress: ProgressCallback | None = None) -> ArchiveInfo:
        info = await super().archive(workspace_id, home_store_key, progress)
        self.volumes.pop(home_store_key, None)  # before the caller committed the archive
        return info


class OwnershipOfVolumesIgnored(MemoryStorageProvider):
    """Checks a volume's managed-by label but not whose workspace it is."""

    def _require_ours(self, name: str, workspace_id: str | None) -> MemoryVolume | None:
        return super()._require_ours(name, None)


class ArchiveDeletesTheVolumeWhenItFails(MemoryStorageProvider):
    async def archive(self, workspace_id: str, home_store_key: str,
                      progress: ProgressCallback | None = None) -> ArchiveInfo:
        try:
            return await super().archive(workspace_id, home_store_key, progress)
        except BaseException:
            self.volumes.pop(home_store_key, None)
            raise


class RestoreKeepsHalfMadeVolumes(MemoryStorageProvider):
    def _discard(self, name: str, workspace_id: str) -> None:
        return None


class VolumeStatusIgnoresTheWorkspace(MemoryStorageProvider):
    """The Docker provider's old bug: any volume of that name reads PRESENT."""

    async def get_volume_status(self, workspace_id: str, home_store_key: str) -> VolumeState:
        return VolumeState.PRESENT if home_store_key in self.volumes else VolumeState.MISSING


class ListManagedIgnoresTheWorkspace(MemoryStorageProvider):
    async def list_managed(self, workspace_id: str | None = None) -> list[ManagedResource]:
        return await super().list_managed()


class DeletesIgnoreTheWorkspace(MemoryStorageProvider):
    """The old `purge`: it checked that a volume was CodeHub's, not whose."""

    async def delete_volume(self, workspace_id: str, home_store_key: str) -> None:
        if self._require_ours(home_store_key, None) is not None:
            del self.volumes[home_store_key]

    async def delete_archive(self, workspace_id: str, archive_key: str) -> None:
        await self.objects.delete(archive_key)


class CloseKeepsTheProviderOpen(MemoryStorageProvider):
    async def close(self) -> None:
        return None


# --- broken ObjectStores ------------------------------------------------------------------


class FailedPutKeepsTheOldMeta(MemoryObjectStore):
    """A failed overwrite puts the old meta back: the old object looks complete again,
    though the caller was told the put failed."""

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], *,
                         fmt: str = ARCHIVE_FORMAT) -> ObjectMeta:
        old = self.metas.get(key)
        try:
            return await super().put_stream(key, chunks, fmt=fmt)
        except BaseException:
            if old is not None:
                self.metas[key] = old
            raise


class DeleteOfMissingRaises(MemoryObjectStore):
    async def delete(self, key: str) -> None:
        if key not in self.objects:
            raise KeyError(key)
        await super().delete(key)


class HeadTrustsTheMeta(MemoryObjectStore):
    async def head(self, key: str) -> ObjectMeta | None:
        return self.metas.get(key)


class CloseKeepsTheStoreOpen(MemoryObjectStore):
    async def close(self) -> None:
        return None


class EnterGivesAnotherObject(MemoryInstanceController):
    async def __aenter__(self) -> Any:
        await self.open()
        return MemoryInstanceController()


Check = Callable[[Any], Awaitable[None]]
CASES = [
    pytest.param(instance_checks.check_stop_and_delete_are_idempotent_and_leave_the_volume,
                 MemoryInstanceKit, StopNotIdempotent, id="stop-not-idempotent"),
    pytest.param(instance_checks.check_start_is_idempotent_and_reuses_the_running_instance,
                 MemoryInstanceKit, StartAlwaysReplaces, id="start-always-replaces"),
    pytest.param(instance_checks.check_start_replaces_a_running_instance_on_another_volume,
                 MemoryInstanceKit, StartIgnoresTheVolume, id="start-ignores-the-volume"),
    pytest.param(instance_checks.check_start_refuses_a_volume_that_does_not_exist,
                 MemoryInstanceKit, StartMakesMissingVolumes, id="start-makes-missing-volumes"),
    pytest.param(storage_checks.
                 check_restore_makes_a_new_volume_and_leaves_the_archive_and_the_old_volume,
                 MemoryStorageKit, RestoreDeletesTheArchive, id="restore-deletes-the-archive"),
    pytest.param(storage_checks.
                 check_a_restore_of_an_archive_swapped_behind_its_meta_raises_integrity_error,
                 MemoryStorageKit, RestoreTrustsTheMeta, id="restore-trusts-the-meta"),
    pytest.param(storage_checks.check_archive_deletes_nothing_and_returns_what_the_store_verified,
                 MemoryStorageKit, ArchiveDeletesTheVolume, id="archive-deletes-the-volume"),
    pytest.param(storage_checks.check_archive_refuses_the_volume_of_another_workspace,
                 MemoryStorageKit, OwnershipOfVolumesIgnored, id="ownership-ignored"),
    pytest.param(storage_checks.
                 check_a_failed_archive_keeps_the_volume_and_stores_nothing_that_verifies,
                 MemoryStorageKit, ArchiveDeletesTheVolumeWhenItFails,
                 id="failed-archive-deletes-the-volume"),
    pytest.param(storage_checks.
                 check_a_restore_cancelled_midway_keeps_the_archive_and_a_rerun_restores_it,
                 MemoryStorageKit, RestoreKeepsHalfMadeVolumes,
                 id="cancelled-restore-keeps-its-half-made-volume"),
    pytest.param(storage_checks.
                 check_get_volume_status_is_present_only_for_the_workspace_own_volume,
                 MemoryStorageKit, VolumeStatusIgnoresTheWorkspace,
                 id="volume-status-ignores-the-workspace"),
    pytest.param(storage_checks.check_list_managed_of_a_workspace_finds_its_own_volumes_only,
                 MemoryStorageKit, ListManagedIgnoresTheWorkspace,
                 id="list-managed-ignores-the-workspace"),
    pytest.param(storage_checks.check_deletes_refuse_another_workspaces_volume_and_archive,
                 MemoryStorageKit, DeletesIgnoreTheWorkspace,
                 id="deletes-ignore-the-workspace"),
    pytest.param(storage_checks.check_works_as_an_async_context_manager_and_closes,
                 MemoryStorageKit, CloseKeepsTheProviderOpen, id="storage-close-keeps-it-open"),
    pytest.param(object_checks.check_works_as_an_async_context_manager_and_closes,
                 MemoryObjectKit, CloseKeepsTheStoreOpen, id="objects-close-keeps-it-open"),
    pytest.param(instance_checks.check_works_as_an_async_context_manager_and_closes,
                 MemoryInstanceKit, EnterGivesAnotherObject, id="enter-gives-another-object"),
    pytest.param(object_checks.check_a_failed_put_stream_leaves_nothing_that_looks_complete,
                 MemoryObjectKit, FailedPutKeepsTheOldMeta, id="failed-put-keeps-the-old-meta"),
    pytest.param(object_checks.check_delete_is_idempotent_and_missing_keys_read_as_absent,
                 MemoryObjectKit, DeleteOfMissingRaises, id="delete-of-missing-raises"),
    pytest.param(object_checks.
                 check_head_raises_integrity_error_when_the_object_size_differs_from_its_meta,
                 MemoryObjectKit, HeadTrustsTheMeta, id="head-trusts-the-meta"),
]


@pytest.mark.parametrize(("check", "kit", "broken"), CASES)
async def test_a_check_fails_against_an_implementation_that_breaks_its_guarantee(
        check: Check, kit: Callable[..., Any], broken: type) -> None:
    await check(kit())  # against the unbroken implementation the check passes
    with pytest.raises(FAILED):
        await check(kit(broken))
