"""What every StorageProvider guarantees (codehub/interfaces.py), one check per guarantee.

Each `check_*` takes a StorageKit and fails (AssertionError or pytest.fail) when the
provider breaks the guarantee its name states. test_conformance_storage.py runs every
check against every implementation; test_conformance_suite.py shows that broken
implementations fail them.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import os
import tarfile

import pytest
from conformance_kits import StorageKit, digests, home_tar
from conformance_tools import (
    FaultyObjects,
    InjectedFault,
    assert_lifetime,
    cancel_when,
    must_succeed,
    read_object,
    sha256_of_object,
)

from codehub.constants import archive_key
from codehub.interfaces import (
    AdapterError,
    IntegrityError,
    ManagedResource,
    PermanentError,
    Progress,
)
from codehub.model import VolumeState

W1, W2 = "w1", "w2"
FILES = {".bashrc": b"export EDITOR=vi\n", "project/src/main.py": b"print('hello')\n" * 200,
         "empty.txt": b""}
MiB = 1024 * 1024


def big_files() -> dict[str, bytes]:
    """A home whose archive takes several chunks to read, upload and download."""
    return {**FILES, "big.bin": os.urandom(3 * MiB)}


async def _volumes_of(kit: StorageKit, workspace_id: str) -> list[str]:
    found = await kit.storage().list_managed()
    assert all(r.kind == "volume" for r in found), found
    return [r.name for r in found if r.workspace_id == workspace_id]


async def _home(kit: StorageKit, workspace_id: str, files: dict[str, bytes]) -> str:
    key = await kit.storage().provision(workspace_id)
    await kit.write(key, files)
    return key


async def check_provision_is_idempotent_labels_the_volume_and_makes_it_empty(
        kit: StorageKit) -> None:
    storage = kit.storage()
    key = await storage.provision(W1)
    assert await must_succeed(storage.provision(W1), "a second provision") == key
    assert await storage.get_volume_status(W1, key) is VolumeState.PRESENT
    assert ManagedResource("volume", key, W1) in await storage.list_managed()
    assert await kit.read(key) == {}


async def check_provision_and_delete_refuse_a_volume_that_is_not_ours(kit: StorageKit) -> None:
    name = kit.volume_name(W1)
    await kit.add_foreign_volume(name)
    storage = kit.storage()
    with pytest.raises(PermanentError):
        await storage.provision(W1)
    with pytest.raises(PermanentError):
        await storage.delete_volume(W1, name)
    assert await storage.get_volume_status(W1, name) is VolumeState.MISSING
    assert name not in [r.name for r in await storage.list_managed()]


async def check_get_volume_status_of_an_unknown_volume_is_missing_and_changes_nothing(
        kit: StorageKit) -> None:
    storage = kit.storage()
    for _ in range(2):
        assert await storage.get_volume_status(W1, kit.volume_name(W1)) is VolumeState.MISSING
    assert await storage.list_managed() == []


async def check_get_volume_status_is_present_only_for_the_workspace_own_volume(
        kit: StorageKit) -> None:
    storage = kit.storage()
    key = await storage.provision(W1)
    assert await storage.get_volume_status(W1, key) is VolumeState.PRESENT
    assert await storage.get_volume_status(W2, key) is VolumeState.MISSING, \
        "another workspace's volume reads PRESENT"
    foreign = kit.volume_name("w3")
    await kit.add_foreign_volume(foreign)
    assert await storage.get_volume_status("w3", foreign) is VolumeState.MISSING, \
        "a volume CodeHub does not manage reads PRESENT"


async def check_list_managed_of_a_workspace_finds_its_own_volumes_only(
        kit: StorageKit) -> None:
    storage = kit.storage()
    keys = [await storage.provision(wid) for wid in (W1, W2)]
    await kit.add_foreign_volume(kit.volume_name("w3"))
    assert await storage.list_managed(W1) == [ManagedResource("volume", keys[0], W1)]
    assert await storage.list_managed(W2) == [ManagedResource("volume", keys[1], W2)]
    assert await storage.list_managed("w3") == []
    with pytest.raises(PermanentError):
        await storage.list_managed("../w1")


async def check_works_as_an_async_context_manager_and_closes(kit: StorageKit) -> None:
    storage = kit.storage()
    await assert_lifetime(storage, lambda: storage.get_volume_status(W1, kit.volume_name(W1)),
                         lambda: kit.released(storage))


async def check_an_invalid_workspace_id_is_a_permanent_error(kit: StorageKit) -> None:
    storage = kit.storage()
    for bad in ("Bad_Id", "../w1", ""):
        with pytest.raises(PermanentError):
            await storage.provision(bad)
        with pytest.raises(PermanentError):
            await storage.archive(bad, kit.volume_name(W1))
        with pytest.raises(PermanentError):
            await storage.restore(bad, archive_key(W1), "a" * 64)
    assert await storage.list_managed() == []


async def check_archive_deletes_nothing_and_returns_what_the_store_verified(
        kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    info = await kit.storage().archive(W1, key)
    assert info.key == archive_key(W1)
    meta = await kit.objects.head(info.key)
    assert meta is not None
    assert (meta.size, meta.sha256, meta.format) == (info.size, info.sha256, "tar+gzip")
    assert await sha256_of_object(kit.objects, info.key) == info.sha256
    assert await kit.storage().get_volume_status(W1, key) is VolumeState.PRESENT
    assert await kit.read(key) == digests(FILES), "archive changed the volume"


async def check_archive_is_one_gzip_member_of_a_tar_rooted_at_coder(kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    info = await kit.storage().archive(W1, key)
    plain = gzip.decompress(await read_object(kit.objects, info.key))
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tf:
        members = tf.getmembers()
        assert members[0].name.rstrip("/") == "coder" and members[0].isdir()
        assert all(m.name.rstrip("/") == "coder" or m.name.startswith("coder/")
                   for m in members)
        files = {}
        for m in members:
            if m.isreg():
                got = tf.extractfile(m)
                assert got is not None
                files[m.name.removeprefix("coder/")] = got.read()
    assert digests(files) == digests(FILES)


async def check_archive_is_idempotent(kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    await kit.storage().archive(W1, key)
    again = await must_succeed(kit.storage().archive(W1, key), "a second archive")
    meta = await kit.objects.head(again.key)
    assert meta is not None and (meta.size, meta.sha256) == (again.size, again.sha256)
    restored = await kit.storage().restore(W1, again.key, again.sha256)
    assert await kit.read(restored) == digests(FILES)


async def check_archive_of_a_missing_volume_is_permanent(kit: StorageKit) -> None:
    with pytest.raises(PermanentError):
        await kit.storage().archive(W1, kit.volume_name(W1))
    assert await kit.objects.head(archive_key(W1)) is None


async def check_archive_refuses_the_volume_of_another_workspace(kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    with pytest.raises(PermanentError):
        await kit.storage().archive(W2, key)
    assert await kit.objects.head(archive_key(W2)) is None
    assert await kit.read(key) == digests(FILES)


async def check_a_failed_archive_keeps_the_volume_and_stores_nothing_that_verifies(
        kit: StorageKit) -> None:
    key = await _home(kit, W1, big_files())
    before = await kit.read(key)
    with pytest.raises(AdapterError) as caught:
        await kit.storage(FaultyObjects(kit.objects, fail_put_after=100_000)).archive(W1, key)
    assert isinstance(caught.value, InjectedFault) or caught.value.retryable
    assert await kit.storage().get_volume_status(W1, key) is VolumeState.PRESENT
    assert await kit.read(key) == before, "a failed archive changed the volume"
    assert await kit.objects.head(archive_key(W1)) is None
    info = await must_succeed(kit.storage().archive(W1, key), "archive after a failed one")
    assert (await kit.objects.head(info.key)) is not None


async def check_an_archive_cancelled_midway_keeps_the_volume_and_a_rerun_archives_it(
        kit: StorageKit) -> None:
    files = big_files()
    key = await _home(kit, W1, files)
    started = asyncio.Event()

    async def progress(p: Progress) -> None:
        started.set()

    async def reached() -> bool:
        return started.is_set()

    assert await cancel_when(kit.storage().archive(W1, key, progress), reached), \
        "archive ended before its first progress report could cut it"
    assert await kit.storage().get_volume_status(W1, key) is VolumeState.PRESENT
    assert await kit.read(key) == digests(files)
    info = await must_succeed(kit.storage().archive(W1, key), "archive after a cancelled one")
    meta = await kit.objects.head(info.key)
    assert meta is not None and meta.sha256 == info.sha256
    restored = await kit.storage().restore(W1, info.key, info.sha256)
    assert await kit.read(restored) == digests(files)


async def check_restore_makes_a_new_volume_and_leaves_the_archive_and_the_old_volume(
        kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    storage = kit.storage()
    info = await storage.archive(W1, key)
    before = await kit.objects.head(info.key)
    restored = await storage.restore(W1, info.key, info.sha256)
    assert restored != key
    assert await storage.get_volume_status(W1, restored) is VolumeState.PRESENT
    assert await kit.read(restored) == digests(FILES)
    assert await kit.read(key) == digests(FILES), "restore touched the old volume"
    assert await kit.objects.head(info.key) == before, "restore touched the archive"
    assert await sha256_of_object(kit.objects, info.key) == info.sha256
    assert ManagedResource("volume", restored, W1) in await storage.list_managed()


async def check_restore_is_idempotent(kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    info = await kit.storage().archive(W1, key)
    await kit.storage().delete_volume(W1, key)
    first = await kit.storage().restore(W1, info.key, info.sha256)
    second = await must_succeed(kit.storage().restore(W1, info.key, info.sha256),
                                "a second restore")
    assert second == first
    assert await kit.read(second) == digests(FILES)
    assert await _volumes_of(kit, W1) == [second]
    assert await kit.objects.head(info.key) is not None


async def _archived(kit: StorageKit, files: dict[str, bytes]) -> tuple[str, str]:
    """(archive key, sha256) of W1's home holding `files`, its volume purged."""
    key = await _home(kit, W1, files)
    info = await kit.storage().archive(W1, key)
    await kit.storage().delete_volume(W1, key)
    return info.key, info.sha256


async def _assert_archive_kept(kit: StorageKit, key: str, sha256: str) -> None:
    meta = await kit.objects.head(key)
    assert meta is not None and meta.sha256 == sha256, "the archive was touched"
    assert await sha256_of_object(kit.objects, key) == sha256, "the archive's bytes changed"


async def check_a_corrupted_restore_raises_integrity_error_keeps_the_archive_and_no_volume(
        kit: StorageKit) -> None:
    key, sha256 = await _archived(kit, FILES)
    corrupting = kit.storage(FaultyObjects(kit.objects, corrupt_reads=True))
    with pytest.raises(IntegrityError):
        await corrupting.restore(W1, key, sha256)
    await _assert_archive_kept(kit, key, sha256)
    assert await _volumes_of(kit, W1) == [], "a failed restore left its volume"
    restored = await must_succeed(kit.storage().restore(W1, key, sha256),
                                  "restore after a corrupted read")
    assert await kit.read(restored) == digests(FILES)


async def check_a_restore_of_an_archive_swapped_behind_its_meta_raises_integrity_error(
        kit: StorageKit) -> None:
    key, sha256 = await _archived(kit, FILES)
    other = gzip.compress(home_tar({"planted.txt": b"not the user's home\n"}), mtime=0)
    swapped = kit.storage(FaultyObjects(kit.objects, substitute=other))
    with pytest.raises(IntegrityError):
        await swapped.restore(W1, key, sha256)
    await _assert_archive_kept(kit, key, sha256)
    assert await _volumes_of(kit, W1) == [], "a failed restore left its volume"


async def check_restore_refuses_an_archive_whose_meta_names_another_sha256(
        kit: StorageKit) -> None:
    key, sha256 = await _archived(kit, FILES)
    with pytest.raises(IntegrityError):
        await kit.storage().restore(W1, key, "0" * 64)
    await _assert_archive_kept(kit, key, sha256)
    assert await _volumes_of(kit, W1) == []


async def check_restore_of_a_missing_archive_or_a_malformed_sha256_is_permanent(
        kit: StorageKit) -> None:
    with pytest.raises(PermanentError):
        await kit.storage().restore(W1, archive_key(W1), "a" * 64)
    key, sha256 = await _archived(kit, FILES)
    for bad in ("not-a-sha256", sha256[:-1], ""):
        with pytest.raises(PermanentError):
            await kit.storage().restore(W1, key, bad)
    assert await _volumes_of(kit, W1) == []
    await _assert_archive_kept(kit, key, sha256)


async def check_restore_over_the_size_limit_is_permanent_and_keeps_the_archive(
        kit: StorageKit) -> None:
    key, sha256 = await _archived(kit, {**FILES, "large.bin": os.urandom(256 * 1024)})
    with pytest.raises(PermanentError):
        await kit.storage().restore(W1, key, sha256, size_limit=128 * 1024)
    await _assert_archive_kept(kit, key, sha256)
    assert await _volumes_of(kit, W1) == []


async def check_a_restore_cancelled_midway_keeps_the_archive_and_a_rerun_restores_it(
        kit: StorageKit) -> None:
    files = big_files()
    key, sha256 = await _archived(kit, files)
    downloading = asyncio.Event()

    def progress(p: Progress) -> None:
        if p.phase == "downloading":
            downloading.set()

    async def reached() -> bool:
        return downloading.is_set()

    assert await cancel_when(kit.storage().restore(W1, key, sha256, progress), reached), \
        "restore ended before its first progress report could cut it"
    await _assert_archive_kept(kit, key, sha256)
    assert await _volumes_of(kit, W1) == [], "a cancelled restore left its volume"
    restored = await must_succeed(kit.storage().restore(W1, key, sha256),
                                  "restore after a cancelled one")
    assert await kit.read(restored) == digests(files)
    assert await _volumes_of(kit, W1) == [restored]


async def check_archive_and_restore_report_progress_to_plain_and_async_callbacks(
        kit: StorageKit) -> None:
    files = big_files()
    key = await _home(kit, W1, files)
    seen: list[Progress] = []
    info = await kit.storage().archive(W1, key, seen.append)
    assert seen, "archive reported no progress"
    assert seen[-1] == Progress("verifying", info.size, info.size)
    got: list[Progress] = []

    async def record(p: Progress) -> None:
        got.append(p)

    restored = await kit.storage().restore(W1, info.key, info.sha256, record)
    assert any(p.phase == "downloading" and p.total == info.size for p in got), got
    assert (got[-1].done, got[-1].total) == (info.size, info.size)
    assert all(p.done <= (p.total or p.done) for p in got)
    assert await kit.read(restored) == digests(files)


async def check_deletes_remove_what_they_are_given_and_ignore_what_is_gone(
        kit: StorageKit) -> None:
    key = await _home(kit, W1, FILES)
    storage = kit.storage()
    info = await storage.archive(W1, key)
    for attempt in ("a first", "a second"):
        await must_succeed(storage.delete_volume(W1, key), f"{attempt} delete of the volume")
        assert await storage.get_volume_status(W1, key) is VolumeState.MISSING
    assert await kit.objects.head(info.key) is not None, "deleting the volume took the archive"
    for attempt in ("a first", "a second"):
        await must_succeed(storage.delete_archive(W1, info.key),
                           f"{attempt} delete of the archive")
        assert await kit.objects.head(info.key) is None
    assert await _volumes_of(kit, W1) == []


async def check_deletes_refuse_another_workspaces_volume_and_archive(kit: StorageKit) -> None:
    storage = kit.storage()
    key = await _home(kit, W1, FILES)
    info = await storage.archive(W1, key)
    with pytest.raises(PermanentError):
        await storage.delete_volume(W2, key)
    for wid, wrong in ((W2, info.key), (W1, "../" + info.key), (W1, info.key + ".meta")):
        with pytest.raises(PermanentError):
            await storage.delete_archive(wid, wrong)
    assert await kit.read(key) == digests(FILES), "a refused delete touched the volume"
    assert await kit.objects.head(info.key) is not None, "a refused delete took the archive"


async def check_list_managed_reports_our_volumes_only(kit: StorageKit) -> None:
    storage = kit.storage()
    keys = [await storage.provision(wid) for wid in (W1, W2)]
    await kit.add_foreign_volume(kit.volume_name("w3"))
    found = await storage.list_managed()
    assert found == sorted(found, key=lambda r: r.name)
    assert [(r.name, r.workspace_id) for r in found] == [(keys[0], W1), (keys[1], W2)]


CHECKS = [f for name, f in list(globals().items()) if name.startswith("check_")]
