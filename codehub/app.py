"""Composition root: the one place that knows every concrete class.

Each resource is a `cleanup_ctx` generator: set up, yield, tear down. aiohttp runs the
teardowns in reverse order, also when a later set-up failed, so a failed start leaves
nothing running (an embedded database included).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web

from . import api, gateway, health, keys, metrics, postgres, store
from .backends.objects import LocalObjectStore, S3ObjectStore
from .clock import SystemClock
from .config import Config, home_owner
from .hints import InProcessHintBus, RedisHintBus
from .interfaces import ObjectStore
from .reconciler.controller import Controller, Schedule
from .reconciler.leader import LeaderElector
from .reconciler.reconciler import EventLog, Policy, Reconciler
from .runtime.docker import DockerInstanceController
from .runtime.firewall import Firewall, host_resolvers
from .runtime.network import BridgeNetwork
from .runtime.sandbox import Sandbox
from .storage.disks import DiskLayout, HomeDisks
from .storage.volumes import DockerVolumeStorage

log = logging.getLogger(__name__)


def build_app(cfg: Config) -> web.Application:
    app = web.Application()
    app[keys.CONFIG] = cfg
    app.cleanup_ctx.extend([database_ctx, hints_ctx, docker_ctx, objects_ctx, reconciler_ctx])
    health.setup(app)
    metrics.setup(app)
    api.setup(app)
    gateway.setup(app, instances=keys.INSTANCES, access_links=False)  # the API mints links
    return app


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    async with postgres.database_url(cfg.database.url, cfg.data_path) as url:
        pool = await postgres.connect_pool(
            url, min_size=cfg.database.pool_min, max_size=cfg.database.pool_max,
            connect_timeout=cfg.database.connect_timeout,
            command_timeout=cfg.database.statement_timeout)
        try:
            async with pool.acquire() as conn:
                applied = await store.migrate(conn)
            log.info("schema at version %d%s", store.LATEST_VERSION,
                     f" (applied {applied})" if applied else "")
            app[keys.DATABASE_URL] = url
            app[keys.POOL] = pool
            app[keys.STORE] = store.Store(pool, timeout=cfg.database.statement_timeout)
            yield
        finally:
            await pool.close()


async def hints_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    if not cfg.redis.url:
        log.info("hints: no redis.url configured; using the in-process hint bus (one replica)")
        app[keys.HINTS] = InProcessHintBus()
        yield
        return
    bus = RedisHintBus(cfg.redis.url)
    log.info("hints: redis %s (%s)", bus.channel,
             "reachable" if await bus.ping() else "UNREACHABLE for now; resync covers it")
    app[keys.HINTS] = bus
    try:
        yield
    finally:
        await bus.close()


async def docker_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    docker = aiodocker.Docker(url=cfg.docker.url or None)
    try:
        version = await docker.version()
        log.info("docker: engine %s at %s", version.get("Version"), docker.docker_host)
    except (aiodocker.DockerError, OSError) as exc:
        log.warning("docker: engine at %s not answering (%s); workspaces cannot start "
                    "until it does", docker.docker_host, exc)
    app[keys.DOCKER] = docker
    try:
        yield
    finally:
        await docker.close()


async def objects_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    objects: ObjectStore
    if cfg.s3.endpoint_url:
        log.info("archives: S3 %s bucket %s", cfg.s3.endpoint_url, cfg.s3.bucket)
        objects = s3 = S3ObjectStore(
            endpoint_url=cfg.s3.endpoint_url, region=cfg.s3.region,
            access_key_id=cfg.s3.access_key_id, secret_access_key=cfg.s3.secret_access_key,
            bucket=cfg.s3.bucket, part_size=cfg.s3.part_size_mib << 20)
        await s3.start()
        closer = s3.close
    else:
        root = cfg.data_path / "objects"
        log.info("archives: no s3.endpoint_url configured; using the local directory %s", root)
        objects = local = LocalObjectStore(root)
        await local.start()
        closer = local.close
    app[keys.OBJECTS] = objects
    try:
        yield
    finally:
        await closer()


async def reconciler_ctx(app: web.Application) -> AsyncIterator[None]:
    cfg = app[keys.CONFIG]
    rc = cfg.reconciler
    docker = app[keys.DOCKER]
    dc = cfg.docker
    firewall = Firewall() if dc.firewall == "iptables" else None
    if firewall is None:
        log.warning("docker.firewall = off: workspaces can reach each other, the host's "
                    "services and private networks; only for a single trusted user")
    gateway_container = dc.gateway_container or None
    resolvers = host_resolvers() if dc.egress == "public" else ()
    helper_image = cfg.archive.helper_image or dc.workspace_image
    disks = HomeDisks(docker, helper_image=helper_image,
                      layout=DiskLayout(dc.home_image_dir, dc.home_mount_dir),
                      local=gateway_container is None)
    storage = DockerVolumeStorage(
        docker=docker, objects=app[keys.OBJECTS], helper_image=helper_image,
        compression_level=cfg.archive.compression_level,
        volume_prefix=dc.volume_prefix, home_owner=home_owner(dc.home_owner),
        home_size_limit=(dc.home_size_limit_mib << 20) or None, disks=disks,
        restore_network=BridgeNetwork(
            docker, f"{dc.network}-restore", gateway_container, firewall=firewall,
            host_tcp=True,
        ) if cfg.archive.restore_with == "tar" else None)
    instances = DockerInstanceController(
        docker=docker, name_prefix=dc.container_prefix,
        network=[BridgeNetwork(docker, name, gateway_container, firewall=firewall,
                               egress=dc.egress, allow=dc.egress_allow, dns=resolvers)
                 for name in ([dc.network] if dc.networks == 1 else
                              [f"{dc.network}-{i}" for i in range(dc.networks)])],
        sandbox=Sandbox(memory_limit_bytes=(dc.memory_limit_mib << 20) or None,
                        cpu_limit=dc.cpu_limit or None, pids_limit=dc.pids_limit or None,
                        cap_add=tuple(dc.cap_add), read_only_root=dc.read_only_root,
                        tmp_size_bytes=dc.tmp_size_mib << 20),
        command=dc.command, port=dc.port, health_path=dc.health_path,
        start_timeout=dc.start_timeout, prepare_volume=storage.ensure_home)
    app[keys.INSTANCES] = instances
    app[keys.STORAGE] = storage
    clock = SystemClock()
    hints = app[keys.HINTS]
    events = EventLog(rc.event_log) if rc.event_log else None
    reconciler = Reconciler(
        store=app[keys.STORE], instances=instances, storage=storage, clock=clock,
        policy=Policy(max_failures=rc.max_failures, backoff_base=rc.backoff_base,
                      backoff_max=rc.backoff_max, stuck_timeout=rc.stuck_timeout),
        on_change=hints.publish, events=events)
    controller = Controller(
        reconciler=reconciler, store=app[keys.STORE], hints=hints, instances=instances,
        storage=storage, objects=app[keys.OBJECTS], clock=clock,
        schedule=Schedule(workers=rc.workers, resync_interval=rc.resync_interval,
                          ttl_sweep_interval=rc.ttl_sweep_interval,
                          default_warm_ttl=rc.default_warm_ttl,
                          default_cold_ttl=rc.default_cold_ttl,
                          backoff_base=rc.backoff_base, backoff_max=rc.backoff_max))
    elector = LeaderElector(app[keys.DATABASE_URL], controller.lead,
                            check_interval=rc.leader_check_interval)
    app[keys.ELECTOR] = elector
    task = None
    if rc.enabled:
        task = asyncio.create_task(elector.run(), name="codehub-election")
    else:
        log.info("reconciler disabled in this replica (reconciler.enabled = false)")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await instances.close()
        if events is not None:
            events.close()
