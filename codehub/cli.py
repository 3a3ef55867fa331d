"""The `codehub` command.

Exit codes: 0 success; 2 bad configuration or usage (one line naming the key); 3 the
database stayed unreachable for `database.connect_timeout` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import client, logs, postgres, store
from . import config as config_mod

if TYPE_CHECKING:
    from aiohttp import web

    from .gateway import limits

EXIT_CONFIG = 2
EXIT_DATABASE = 3

log = logging.getLogger("codehub")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="codehub", description="CodeHub gateway and reconciler.")
    p.add_argument("--config", "-c", default=os.environ.get("CODEHUB_CONFIG"),
                   help="TOML config file (default: $CODEHUB_CONFIG, else built-in defaults)")
    # --config is accepted before or after the sub-command (`codehub serve --config f`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", parents=[common],
                   help="run the gateway (and the reconciler when leader)")
    sub.add_parser("migrate", parents=[common], help="apply database migrations and exit")
    cfg = sub.add_parser("config", parents=[common], help="configuration helpers")
    cfg.add_argument("action", choices=["example", "check", "show"],
                     help="example: print the documented defaults; check: validate; "
                          "show: print the effective settings (secrets masked)")
    _workspace_parser(sub)
    return p


def _workspace_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`codehub workspace ...`: see client.py for where the URL and the token come from."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"API base URL (default: ${client.ENV_URL}, else "
                                      "server.host/port from the config)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    ws = sub.add_parser("workspace", aliases=["ws"], help="manage workspaces through the API "
                        f"of a running CodeHub (token: ${client.ENV_TOKEN})")
    act = ws.add_subparsers(dest="action", required=True)
    add = act.add_parser("create", parents=[common], help="create a workspace")
    add.add_argument("id", nargs="?", help="workspace id (default: generated)")
    add.add_argument("--owner", required=True)
    add.add_argument("--image", help="image reference (default: docker.workspace_image)")
    add.add_argument("--desired", choices=["RUNNING", "WARM"])
    add.add_argument("--warm-ttl", type=client.duration, help="idle time before WARM (15m)")
    add.add_argument("--cold-ttl", type=client.duration, help="idle time before COLD (7d)")
    add.add_argument("--home-size", type=client.home_size,
                     help="size of the home (512M, 10G; default: docker.home_size_limit_mib)")
    lst = act.add_parser("list", parents=[common], help="list workspaces")
    lst.add_argument("--status")
    lst.add_argument("--owner")
    lst.add_argument("--limit", type=int, help="print at most this many")
    for name, text in (("show", "show one workspace"), ("delete", "delete a workspace"),
                       ("retry", "return a workspace in ERROR to where it failed"),
                       ("revoke", "invalidate every access link and cookie of a workspace")):
        act.add_parser(name, parents=[common], help=text).add_argument("id")
    upd = act.add_parser("set", parents=[common], help="change desired state and/or TTLs")
    upd.add_argument("id")
    upd.add_argument("--desired", choices=["RUNNING", "WARM", "COLD"])
    for opt in ("--warm-ttl", "--cold-ttl"):
        upd.add_argument(opt, type=client.ttl, default=argparse.SUPPRESS,
                         help="a duration (90, 15m, 2h, 7d) or 'default'")
    upd.add_argument("--home-size", type=client.home_size, default=argparse.SUPPRESS,
                     help="512M, 10G or 'default'; applies to the next home made (provision "
                     "or restore)")
    res = act.add_parser("restore", parents=[common], help="restore a COLD workspace")
    res.add_argument("id")
    res.add_argument("--start", action="store_true", help="continue to RUNNING")
    lnk = act.add_parser("link", parents=[common], help="print a browser access link")
    lnk.add_argument("id")
    lnk.add_argument("--ttl", type=client.duration, help="validity (default: auth.link_ttl)")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "config" and args.action == "example":
        sys.stdout.write(config_mod.example_toml())
        return 0
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as exc:
        print(f"codehub: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(cfg.log_level, cfg.log_format)
    if args.command == "config":
        if args.action == "show":
            import orjson
            sys.stdout.write(orjson.dumps(config_mod.describe_secret_free(cfg),
                                          option=orjson.OPT_INDENT_2).decode() + "\n")
        else:
            print("config ok")
        return 0
    if args.command in ("workspace", "ws"):
        return client.run(args, cfg)
    try:
        if args.command == "migrate":
            return asyncio.run(_migrate(cfg))
        return _serve(cfg)
    except postgres.DatabaseUnavailable as exc:
        print(f"codehub: {exc}", file=sys.stderr)
        return EXIT_DATABASE
    except config_mod.ConfigError as exc:  # e.g. the admin API refusing an open listener
        print(f"codehub: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


async def _migrate(cfg: config_mod.Config) -> int:
    async with postgres.database_url(cfg.database.url, cfg.data_path) as url:
        pool = await postgres.connect_pool(url, min_size=1, max_size=1,
                                           connect_timeout=cfg.database.connect_timeout)
        try:
            async with pool.acquire() as conn:
                applied = await store.migrate(conn)
                version = await store.schema_version(conn)
        finally:
            await pool.close()
    print(f"schema at version {version}; applied now: {applied or 'none'}")
    return 0


def _serve(cfg: config_mod.Config) -> int:
    from .app import build_app

    serve_app(cfg, build_app(cfg))
    return 0


def serve_app(cfg: config_mod.Config, app: web.Application) -> None:
    """Serve `app` on server.host/port until SIGTERM/SIGINT: aiohttp's run_app, with the
    listener's protocol factory wrapped by the connection admission (gateway/limits.py)
    and the descriptor soft limit raised and malloc's mmap threshold fixed first
    (rlimit.py)."""
    from aiohttp.web_runner import GracefulExit

    from .gateway import limits
    from .rlimit import pin_mmap_threshold, raise_nofile

    try:
        import uvloop
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        loop_name = "uvloop"
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        loop = asyncio.new_event_loop()
        loop_name = "asyncio"
    soft = raise_nofile()
    pin_mmap_threshold()
    admission = limits.Admission(cfg.limits, limits.global_cap(cfg.limits, soft))
    log.info("codehub serving on http://%s:%d (%s); data_dir %s; at most %d connections, "
             "%d per client", cfg.server.host, cfg.server.port, loop_name, cfg.data_path,
             admission.max_connections, admission.per_client)
    asyncio.set_event_loop(loop)
    main_task = loop.create_task(_run(cfg, app, admission))
    try:
        loop.run_until_complete(main_task)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main_task.done():
                main_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main_task)
        finally:
            rest = asyncio.all_tasks(loop)
            for task in rest:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
    log.info("codehub stopped")


def app_runner(cfg: config_mod.Config, app: web.Application) -> web.AppRunner:
    """The AppRunner `serve` runs `app` with (bench/proxy.py runs the gateway with it too,
    so that the bench measures what production runs)."""
    from aiohttp import web

    return web.AppRunner(
        app, handle_signals=True, shutdown_timeout=cfg.server.shutdown_timeout,
        # a client that goes away cancels its handler: a proxied request waiting on a
        # workspace must not outlive its browser (nor hold up a shutdown)
        handler_cancellation=True, keepalive_timeout=cfg.limits.idle_timeout,
        access_log=logging.getLogger("aiohttp.access") if cfg.log_level == "DEBUG" else None,
        access_log_class=logs.AccessLog,
    )


async def _run(cfg: config_mod.Config, app: web.Application,
               admission: limits.Admission) -> None:
    from .gateway import limits

    runner = app_runner(cfg, app)
    await runner.setup()
    try:
        await limits.AdmittedSite(runner, admission, cfg.server.host, cfg.server.port).start()
        await asyncio.Event().wait()  # until SIGTERM/SIGINT (GracefulExit) cancels this
    finally:
        await runner.cleanup()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
