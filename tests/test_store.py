"""The store on a real PostgreSQL: migrations, compare-and-set, activity flush, TTL sweeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from codehub import store
from codehub.model import Checkpoint, DesiredState, Operation, Status
from codehub.store import AlreadyExists, Store

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    async with p.acquire() as conn:
        await store.migrate(conn)
    yield p
    await p.close()


@pytest.fixture
def db(pool: asyncpg.Pool) -> Store:
    return Store(pool)


async def test_concurrent_migrations_all_succeed_with_one_schema(
        empty_database_url: str) -> None:
    database_url = empty_database_url
    async def one() -> list[int]:
        conn = await asyncpg.connect(database_url)
        try:
            return await store.migrate(conn)
        finally:
            await conn.close()

    results = await asyncio.gather(*(one() for _ in range(5)))
    applied = sorted(v for r in results for v in r)
    assert applied == list(range(1, store.LATEST_VERSION + 1))  # each applied exactly once
    conn = await asyncpg.connect(database_url)
    try:
        assert await store.schema_version(conn) == store.LATEST_VERSION
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == \
            store.LATEST_VERSION
    finally:
        await conn.close()


async def test_an_archive_committed_before_the_checkpoint_column_keeps_its_place(
        empty_database_url: str) -> None:
    """Before migration 7 the checkpoint was the progress text "removing volume": a row
    an upgrade finds between committing its archive and deleting its volume must not
    archive (a volume that may be gone) again."""
    conn = await asyncpg.connect(empty_database_url)
    try:
        await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, "
                           "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        for mig in store.migrations()[:6]:
            await conn.execute(mig.sql)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                               mig.version, mig.name)
        for wid, phase in (("mid", "removing volume"), ("early", "archiving")):
            await conn.execute(
                "INSERT INTO workspaces (id, owner, image_ref, desired_state, status, operation,"
                " progress_phase) VALUES ($1, 'o', 'i', 'COLD', 'WARM', 'ARCHIVING', $2)",
                wid, phase)
        assert await store.migrate(conn) == list(range(7, store.LATEST_VERSION + 1))
    finally:
        await conn.close()
    pool = await asyncpg.create_pool(empty_database_url, min_size=1, max_size=2)
    assert pool is not None
    try:
        db = Store(pool)
        mid, early = await db.get("mid"), await db.get("early")
        assert mid is not None and mid.checkpoint is Checkpoint.ARCHIVE_COMMITTED
        assert early is not None and early.checkpoint is None
    finally:
        await pool.close()


async def test_every_driver_failure_is_store_unavailable_and_a_good_connection_is_kept(
        database_url: str) -> None:
    """A server-side statement timeout is not a connection failure, yet a caller sees the
    one StoreUnavailable; the connection it ran on is still good and stays in the pool.
    A unique violation is the store's to answer (AlreadyExists), never "unavailable"."""
    p = await asyncpg.create_pool(database_url, min_size=1, max_size=1,
                                  server_settings={"statement_timeout": "100"})
    assert p is not None
    try:
        async with p.acquire() as conn:
            await store.migrate(conn)
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        db = Store(p, timeout=5)
        for query in ("SELECT pg_sleep(1)", "SELECT no_such_column FROM workspaces"):
            with pytest.raises(store.StoreUnavailable):
                await db.pool.fetchval(query)
        assert await db.pool.fetchval("SELECT pg_backend_pid()") == pid  # the same one
        await db.create(id="w", owner="o", image_ref="i")
        with pytest.raises(AlreadyExists):
            await db.create(id="w", owner="o", image_ref="i")
    finally:
        await p.close()


async def test_create_then_get_roundtrips(db: Store) -> None:
    ws = await db.create(id="alice-1", owner="alice", image_ref="img:1", warm_ttl_seconds=60)
    assert ws.status is Status.NEW and ws.operation is Operation.NONE
    assert ws.desired_state is DesiredState.RUNNING and ws.generation == 1
    assert await db.get("alice-1") == ws
    assert await db.get("nobody") is None
    with pytest.raises(AlreadyExists):
        await db.create(id="alice-1", owner="bob", image_ref="img:1")


async def test_compare_and_set_refuses_a_stale_expectation(db: Store) -> None:
    await db.create(id="w", owner="o", image_ref="i")
    won = await db.compare_and_set("w", expect_status=Status.NEW,
                                   expect_operation=Operation.NONE,
                                   operation=Operation.PROVISIONING)
    assert won is not None and won.operation is Operation.PROVISIONING
    # a second writer with the same (now stale) expectation changes nothing
    lost = await db.compare_and_set("w", expect_status=Status.NEW,
                                    expect_operation=Operation.NONE,
                                    operation=Operation.PROVISIONING)
    assert lost is None
    done = await db.compare_and_set("w", expect_status=Status.NEW,
                                    expect_operation=Operation.PROVISIONING,
                                    status=Status.WARM, operation=Operation.NONE,
                                    home_store_key="vol-w")
    assert done is not None and done.status is Status.WARM and done.home_store_key == "vol-w"


async def test_racing_compare_and_sets_have_exactly_one_winner(db: Store) -> None:
    await db.create(id="w", owner="o", image_ref="i")
    results = await asyncio.gather(*(
        db.compare_and_set("w", expect_status=Status.NEW, expect_operation=Operation.NONE,
                           operation=Operation.PROVISIONING) for _ in range(10)))
    assert sum(r is not None for r in results) == 1


async def test_compare_and_set_cannot_touch_desired_state(db: Store) -> None:
    await db.create(id="w", owner="o", image_ref="i")
    with pytest.raises(ValueError, match="desired_state"):
        await db.compare_and_set("w", expect_status=Status.NEW,
                                 expect_operation=Operation.NONE, desired_state="COLD")


async def test_set_desired_bumps_generation_and_honours_expected_status(db: Store) -> None:
    await db.create(id="w", owner="o", image_ref="i")
    ws = await db.set_desired("w", DesiredState.WARM)
    assert ws is not None and ws.generation == 2 and ws.desired_state is DesiredState.WARM
    assert await db.set_desired("w", DesiredState.RUNNING, expect_status=[Status.COLD]) is None
    assert await db.set_desired("missing", DesiredState.WARM) is None


async def test_activity_flush_is_one_batch_and_never_moves_backwards(db: Store) -> None:
    for i in range(50):
        await db.create(id=f"w{i:02}", owner="o", image_ref="i", now=T0)
    ids = [f"w{i:02}" for i in range(50)]
    marks = [T0 + timedelta(seconds=i) for i in range(50)]
    assert await db.flush_activity(ids, marks) == 49  # w00's mark equals its current value
    assert (await db.get("w10")).last_access_at == T0 + timedelta(seconds=10)  # type: ignore[union-attr]
    # an older mark (a slow replica's) does not move last_access_at back
    assert await db.flush_activity(["w10"], [T0]) == 0
    assert (await db.get("w10")).last_access_at == T0 + timedelta(seconds=10)  # type: ignore[union-attr]
    assert await db.flush_activity([], []) == 0
    assert await db.flush_activity(["unknown"], [T0]) == 0


async def settle(db: Store, wid: str, status: Status, desired: DesiredState) -> None:
    await db.pool.execute("UPDATE workspaces SET status = $2, desired_state = $3 WHERE id = $1",
                          wid, status.value, desired.value)


async def test_ttl_sweeps_step_down_idle_rows_with_per_workspace_ttls(db: Store) -> None:
    await db.create(id="default", owner="o", image_ref="i", now=T0)
    await db.create(id="short", owner="o", image_ref="i", now=T0, warm_ttl_seconds=60)
    await db.create(id="long", owner="o", image_ref="i", now=T0, warm_ttl_seconds=7200)
    await db.create(id="busy", owner="o", image_ref="i", now=T0)
    await db.create(id="cold-candidate", owner="o", image_ref="i", now=T0, cold_ttl_seconds=600)
    for wid in ("default", "short", "long", "busy"):
        await settle(db, wid, Status.RUNNING, DesiredState.RUNNING)
    await settle(db, "cold-candidate", Status.WARM, DesiredState.WARM)
    await db.flush_activity(["busy"], [T0 + timedelta(minutes=59)])

    assert await db.sweep_warm(T0 + timedelta(seconds=61), 1800) == ["short"]
    stepped = await db.sweep_warm(T0 + timedelta(minutes=61), 1800)
    assert sorted(stepped) == ["default"]  # busy was touched, long has 2 h
    assert (await db.get("default")).desired_state is DesiredState.WARM  # type: ignore[union-attr]
    assert await db.sweep_cold(T0 + timedelta(seconds=599), 86400) == []
    assert await db.sweep_cold(T0 + timedelta(seconds=601), 86400) == ["cold-candidate"]


async def test_sweep_skips_rows_mid_operation_or_already_moving(db: Store) -> None:
    await db.create(id="op", owner="o", image_ref="i", now=T0)
    await settle(db, "op", Status.RUNNING, DesiredState.RUNNING)
    await db.pool.execute("UPDATE workspaces SET operation = 'STOPPING' WHERE id = 'op'")
    assert await db.sweep_warm(T0 + timedelta(days=1), 60) == []


async def test_each_sweep_is_one_update_over_its_tiers_partial_index(
        db: Store, database_url: str) -> None:
    """The plans of the statements Store.sweep_warm / sweep_cold really send, as PostgreSQL's
    auto_explain reports them to the session that ran them."""
    for i in range(200):
        await db.create(id=f"w{i:03}", owner="o", image_ref="i", now=T0)
    await db.pool.execute("ANALYZE workspaces")
    conn = await asyncpg.connect(database_url)
    try:
        plans: list[str] = []
        conn.add_log_listener(lambda _conn, msg: plans.append(msg.message))
        await conn.execute("LOAD 'auto_explain'")
        await conn.execute("SET auto_explain.log_min_duration = 0")
        await conn.execute("SET auto_explain.log_level = NOTICE")  # sent to this client
        await conn.execute("SET enable_seqscan = off")  # a plan the index can satisfy
        on_conn = Store(conn)  # a Connection has the pool's API
        for sweep, index in ((on_conn.sweep_warm, "workspaces_running_idle"),
                             (on_conn.sweep_cold, "workspaces_warm_idle")):
            plans.clear()
            assert await sweep(T0, 60) == []
            await asyncio.sleep(0)  # notices are delivered with the result; be sure
            statements = [p for p in plans if "Query Text:" in p]
            assert len(statements) == 1, plans  # one statement per sweep
            assert "UPDATE workspaces" in statements[0]
            assert index in statements[0], statements[0]
    finally:
        await conn.close()


async def test_touch_during_sweep_protects_the_row(db: Store, pool: asyncpg.Pool) -> None:
    """The sweep's WHERE clause is re-checked under the row lock (READ COMMITTED)."""
    await db.create(id="w", owner="o", image_ref="i", now=T0)
    await settle(db, "w", Status.RUNNING, DesiredState.RUNNING)
    async with pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("UPDATE workspaces SET last_access_at = $1 WHERE id = 'w'",
                           T0 + timedelta(hours=5))
        sweep = asyncio.create_task(db.sweep_warm(T0 + timedelta(hours=2), 60))
        await asyncio.sleep(0.3)
        assert not sweep.done()  # blocked on the row lock
        await tx.commit()
    assert await sweep == []
    assert (await db.get("w")).desired_state is DesiredState.RUNNING  # type: ignore[union-attr]


async def test_list_pages_by_cursor_and_filters(db: Store) -> None:
    for i in range(7):
        await db.create(id=f"w{i}", owner="alice" if i % 2 else "bob", image_ref="i")
    page1 = await db.list_page(limit=3)
    page2 = await db.list_page(limit=3, after_id=page1[-1].id)
    page3 = await db.list_page(limit=3, after_id=page2[-1].id)
    assert [w.id for w in page1 + page2 + page3] == [f"w{i}" for i in range(7)]
    assert {w.owner for w in await db.list_page(owner="alice")} == {"alice"}
    assert await db.list_page(status=Status.COLD) == []


async def test_resync_ids_lists_rows_with_work_and_running_ones(db: Store) -> None:
    await db.create(id="new", owner="o", image_ref="i")
    await db.create(id="done", owner="o", image_ref="i")
    await db.create(id="running", owner="o", image_ref="i")
    await settle(db, "done", Status.WARM, DesiredState.WARM)
    await settle(db, "running", Status.RUNNING, DesiredState.RUNNING)
    assert sorted(await db.resync_ids()) == ["new", "running"]


async def test_delete_row_requires_the_expected_status(db: Store) -> None:
    await db.create(id="w", owner="o", image_ref="i")
    assert not await db.delete_row("w", expect_status=Status.DELETED)
    await settle(db, "w", Status.DELETED, DesiredState.DELETED)
    assert await db.delete_row("w", expect_status=Status.DELETED)
    assert await db.get("w") is None


async def test_set_desired_refuses_a_row_whose_operation_is_not_expected(db: Store) -> None:
    """Regression: a gateway wake racing the start of an archive must not end in an
    automatic restore (COLD with desired RUNNING)."""
    await db.create(id="w", owner="o", image_ref="i", desired_state=DesiredState.COLD)
    await settle(db, "w", Status.WARM, DesiredState.COLD)
    await db.pool.execute("UPDATE workspaces SET operation = 'ARCHIVING' WHERE id = 'w'")
    awake = [o for o in Operation if o is not Operation.ARCHIVING]
    assert await db.set_desired("w", DesiredState.RUNNING, expect_status=[Status.WARM],
                                expect_operation=awake) is None
    await db.pool.execute("UPDATE workspaces SET operation = 'NONE' WHERE id = 'w'")
    ws = await db.set_desired("w", DesiredState.RUNNING, expect_status=[Status.WARM],
                              expect_operation=awake)
    assert ws is not None and ws.desired_state is DesiredState.RUNNING
