"""Composition root: the one place that knows every concrete class.

Each resource is a `cleanup_ctx` generator: set up, yield, tear down. aiohttp runs the
teardowns in reverse order, also when a later set-up failed, so a failed start leaves
nothing running (an embedded database included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import aiodocker
from aiohttp import web

from . import api, gateway, health, keys, metrics, postgres, store
from .backends.docker.containers import DockerInstanceController
from .backends.docker.disks import DiskLayout, HomeDisks
from .backends.docker.engine import engine_client
from .backends.docker.firewall import Firewall, host_resolvers
from .backends.docker.network import BridgeNetwork
from .backends.docker.sandbox import Sandbox
from .backends.docker.volumes import DockerVolumeStorage
from .backends.objects import LocalObjectStore, S3ObjectStore
from .clock import SystemClock
from .config import Config, home_owner
from .hints import InProcessHintBus, RedisHintBus
from .interfaces import ObjectStore
from .reconciler.controller import Controller, Schedule
from .reconciler.leader import LeaderElector
from .reconciler.reconciler import EventLog, Policy, Reconciler

log = logging.getLogger(__name__)


def build_app(cfg: Config) -> web.Application:
    app = web.Application()
    app[keys.CONFIG] = cfg
    app.cleanup_ctx.extend([database_ctx, hints_ctx, docker_ctx, backends_ctx,
                             reconciler_ctx])
    health.setup(app)
    metrics.setup(app)
    api.setup(app)
    gateway.setup(app, instances=keys.INSTANCES)
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
    async with engine_client(app[keys.CONFIG].docker.url) as docker:
        app[keys.DOCKER] = docker
        yield


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    """The adapters, each entered once (their lifetime: codehub.interfaces.Adapter) and
    closed in reverse order on the way out."""
    cfg = app[keys.CONFIG]
    docker = app[keys.DOCKER]
    firewall = _firewall(cfg)
    objects = _object_store(cfg)
    storage = _docker_storage(cfg, docker, objects, firewall)
    instances = _docker_instances(cfg, docker, storage, firewall)
    async with contextlib.AsyncExitStack() as stack:
        for adapter in (objects, storage, instances):
            await stack.enter_async_context(adapter)
        app[keys.OBJECTS] = objects
        app[keys.STORAGE] = storage
        app[keys.INSTANCES] = instances
        yield


def _firewall(cfg: Config) -> Firewall | None:
    if cfg.docker.firewall == "iptables":
        return Firewall()
    log.warning("docker.firewall = off: workspaces can reach each other, the host's "
                "services and private networks; only for a single trusted user")
    return None


def _object_store(cfg: Config) -> ObjectStore:
    if cfg.s3.endpoint_url:
        log.info("archives: S3 %s bucket %s", cfg.s3.endpoint_url, cfg.s3.bucket)
        return S3ObjectStore(
            endpoint_url=cfg.s3.endpoint_url, region=cfg.s3.region,
            access_key_id=cfg.s3.access_key_id, secret_access_key=cfg.s3.secret_access_key,
            bucket=cfg.s3.bucket, part_size=cfg.s3.part_size_mib << 20)
    root = cfg.data_path / "objects"
    log.info("archives: no s3.endpoint_url configured; using the local directory %s", root)
    return LocalObjectStore(root)


def _docker_storage(cfg: Config, docker: aiodocker.Docker, objects: ObjectStore,
                    firewall: Firewall | None) -> DockerVolumeStorage:
    dc = cfg.docker
    gateway_container = dc.gateway_container or None
    helper_image = cfg.archive.helper_image or dc.workspace_image
    disks = HomeDisks(docker, helper_image=helper_image,
                      layout=DiskLayout(dc.home_image_dir, dc.home_mount_dir),
                      local=gateway_container is None)
    return DockerVolumeStorage(
        docker=docker, objects=objects, helper_image=helper_image,
        compression_level=cfg.archive.compression_level,
        volume_prefix=dc.volume_prefix, home_owner=home_owner(dc.home_owner),
        home_size_limit=(dc.home_size_limit_mib << 20) or None, disks=disks,
        restore_network=BridgeNetwork(
            docker, f"{dc.network}-restore", gateway_container, firewall=firewall,
            host_tcp=True,
        ) if cfg.archive.restore_with == "tar" else None)


def _docker_instances(cfg: Config, docker: aiodocker.Docker, storage: DockerVolumeStorage,
                      firewall: Firewall | None) -> DockerInstanceController:
    dc = cfg.docker
    resolvers = host_resolvers() if dc.egress == "public" else ()
    names = [dc.network] if dc.networks == 1 else [f"{dc.network}-{i}"
                                                   for i in range(dc.networks)]
    return DockerInstanceController(
        docker=docker, name_prefix=dc.container_prefix,
        network=[BridgeNetwork(docker, name, dc.gateway_container or None, firewall=firewall,
                               egress=dc.egress, allow=dc.egress_allow, dns=resolvers)
                 for name in names],
        sandbox=Sandbox(memory_limit_bytes=(dc.memory_limit_mib << 20) or None,
                        cpu_limit=dc.cpu_limit or None, pids_limit=dc.pids_limit or None,
                        cap_add=tuple(dc.cap_add), read_only_root=dc.read_only_root,
                        tmp_size_bytes=dc.tmp_size_mib << 20),
        command=dc.command, port=dc.port, health_path=dc.health_path,
        start_timeout=dc.start_timeout, prepare_volume=storage.ensure_home)


async def reconciler_ctx(app: web.Application) -> AsyncIterator[None]:
    rc = app[keys.CONFIG].reconciler
    events = EventLog(rc.event_log) if rc.event_log else None
    controller = _controller(app, events)
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
        if events is not None:
            events.close()


def _controller(app: web.Application, events: EventLog | None) -> Controller:
    rc = app[keys.CONFIG].reconciler
    clock = SystemClock()
    hints = app[keys.HINTS]
    reconciler = Reconciler(
        store=app[keys.STORE], instances=app[keys.INSTANCES], storage=app[keys.STORAGE],
        clock=clock, on_change=hints.publish, events=events,
        policy=Policy(max_failures=rc.max_failures, backoff_base=rc.backoff_base,
                      backoff_max=rc.backoff_max, stuck_timeout=rc.stuck_timeout))
    return Controller(
        reconciler=reconciler, store=app[keys.STORE], hints=hints,
        instances=app[keys.INSTANCES], storage=app[keys.STORAGE], objects=app[keys.OBJECTS],
        clock=clock,
        schedule=Schedule(workers=rc.workers, resync_interval=rc.resync_interval,
                          ttl_sweep_interval=rc.ttl_sweep_interval,
                          default_warm_ttl=rc.default_warm_ttl,
                          default_cold_ttl=rc.default_cold_ttl,
                          backoff_base=rc.backoff_base, backoff_max=rc.backoff_max))
