"""A workspace user against the real engine: nothing but what the operator allows is
reachable from inside a workspace, as its user or as root (`docker exec -u 0`); the
gateway (the host's network namespace) still reaches every workspace, and a restore
still works. Guarantees of codehub/backends/docker/firewall.py, network.py and sandbox.py.

Run for both deployments: the firewall installed by this process on the host, and by
the gateway's image in a container run with `--network host --cap-add NET_ADMIN`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiodocker
import aiohttp
import pytest
from harness.services import DockerEngine, PostgresServer, RedisServer, S3Server
from isolation_support import (
    HostUdpEcho,
    NetnsHosts,
    Target,
    exec_in,
    host_ipv4_addresses,
    listening_tcp_ports,
    netns_test_hosts,
    probe_from,
    start_udp_echo,
)

from codehub.backends.docker.containers import DockerInstanceController
from codehub.backends.docker.feed import FeedListener
from codehub.backends.docker.firewall import Firewall
from codehub.backends.docker.network import BridgeNetwork
from codehub.backends.docker.sandbox import Sandbox

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parent.parent

# Runs in the gateway's image, in the host's network namespace: make both networks and
# install their firewall, as `codehub serve` does in the single-container deployment.
IN_GATEWAY_CONTAINER = r"""
import asyncio, json, sys
import aiodocker
from codehub.backends.docker.firewall import Firewall
from codehub.backends.docker.network import BridgeNetwork

args = json.loads(sys.argv[1])

async def main():
    async with aiodocker.Docker(url="unix:///var/run/docker.sock") as docker:
        firewall = Firewall()
        await BridgeNetwork(docker, args["network"], args["me"], firewall=firewall,
                            egress=args["egress"]).ensure()
        await BridgeNetwork(docker, args["restore"], args["me"], firewall=firewall,
                            host_tcp=True).ensure()
        print("ok")

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[NetnsHosts]:
    yield from netns_test_hosts()


@pytest.fixture(scope="module")
def gateway_image(docker_engine: DockerEngine) -> Iterator[str]:
    tag = "codehub-gateway-test:isolation"
    proc = subprocess.run([str(ROOT / "scripts" / "build-gateway-image"), tag],
                          capture_output=True, text=True, timeout=900, env=docker_engine.env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    try:
        yield tag
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=60,
                       env=docker_engine.env())


class Stack:
    def __init__(self, docker: aiodocker.Docker, prefix: str, egress: str,
                 firewall: Firewall | None, gateway_container: str | None = None) -> None:
        self.network = BridgeNetwork(docker, f"{prefix}-net", gateway_container,
                                     firewall=firewall, egress=egress)
        self.restore = BridgeNetwork(docker, f"{prefix}-restore", gateway_container,
                                     firewall=firewall, host_tcp=True)
        self.controller = DockerInstanceController(
            docker=docker, network=self.network, name_prefix=f"{prefix}-ws-",
            sandbox=Sandbox(memory_limit_bytes=256 << 20, pids_limit=512), start_timeout=60)


async def _volume(docker: aiodocker.Docker, name: str) -> str:
    await docker.volumes.create({"Name": name})
    return name


async def _address(docker: aiodocker.Docker, container: str, network: str) -> str:
    info = (await docker.containers.get(container))._container
    return str(info["NetworkSettings"]["Networks"][network]["IPAddress"])


async def _http_status(host: str, port: int) -> int:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://{host}:{port}/healthz", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status


@pytest.fixture
async def stack(request: pytest.FixtureRequest, docker: aiodocker.Docker,
                docker_prefix: str, docker_engine: DockerEngine
                ) -> AsyncIterator[tuple[Stack, str]]:
    deployment, egress = request.param
    if deployment == "container":
        image = request.getfixturevalue("gateway_image")
        socket_path = docker_engine.url.removeprefix("unix://")
        me = f"{docker_prefix}-gateway"
        args = {"network": f"{docker_prefix}-net", "restore": f"{docker_prefix}-restore",
                "egress": egress, "me": me}
        # The gateway's container: it stays up (as `codehub serve` would) while the
        # script installs the networks' firewall from inside it.
        subprocess.run(
            ["docker", "run", "-d", "--name", me, "--network", "host", "--cap-add",
             "NET_ADMIN", "-v", f"{socket_path}:/var/run/docker.sock", "--entrypoint",
             "sleep", image, "600"], check=True, capture_output=True, timeout=60,
            env=docker_engine.env())
        proc = subprocess.run(
            ["docker", "exec", me, "python3", "-c", IN_GATEWAY_CONTAINER, json.dumps(args)],
            capture_output=True, text=True, timeout=120, env=docker_engine.env())
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
        # This process then uses the networks the container made (their shape is right,
        # so they are adopted as they are) without a firewall of its own.
        made = Stack(docker, docker_prefix, egress, firewall=None, gateway_container=me)
    else:
        made = Stack(docker, docker_prefix, egress, firewall=Firewall())
    try:
        yield made, egress
    finally:
        await made.controller.close()


ISOLATION_CASES = [("host", "none"), ("host", "public"), ("container", "public")]


@pytest.mark.parametrize("stack", ISOLATION_CASES, indirect=True,
                         ids=[f"{d}-egress-{e}" for d, e in ISOLATION_CASES])
async def test_a_workspace_reaches_no_other_workspace_no_host_service_and_no_private_range(
        stack: tuple[Stack, str], docker: aiodocker.Docker, docker_prefix: str,
        workspace_image: str, hosts: NetnsHosts, pg_server: PostgresServer,
        redis_server: RedisServer, s3_server: S3Server) -> None:
    made, egress = stack
    ctl = made.controller
    for ws in ("a", "b"):
        await ctl.start(ws, workspace_image, await _volume(docker, f"{docker_prefix}-home-{ws}"))
    a, b = f"{docker_prefix}-ws-a", f"{docker_prefix}-ws-b"
    b_ip = await _address(docker, b, made.network.name)
    await start_udp_echo(docker, b, 5353)

    # Host services on every interface: a TCP listener standing for the gateway's and the
    # API's port, a UDP echo; the test services' own ports; the restore feed, listening.
    gateway_port = socket.socket()
    gateway_port.bind(("0.0.0.0", 0))
    gateway_port.listen(64)
    udp = HostUdpEcho()
    restore_host = await made.restore.own_address()

    async def feed_peer() -> str:
        return "0.0.0.0"  # nobody is the expected peer: only reachability matters here

    try:
        async with FeedListener(restore_host, feed_peer) as feed:
            # (The test services listen on loopback only; they are probed on every host
            # address all the same, as the gateway's own PostgreSQL or Redis could be.)
            service_ports = [urlsplit(pg_server.dsn).port or 0, redis_server.port,
                             urlsplit(s3_server.endpoint_url).port or 0]
            answering: list[Target] = [("tcp", b_ip, p)
                                       for p in await listening_tcp_ports(docker, b)]
            answering.append(("udp", b_ip, 5353))
            targets: list[Target] = []
            for address in host_ipv4_addresses(hosts):
                answering += [("tcp", address, gateway_port.getsockname()[1]),
                              ("udp", address, udp.port)]
                targets += [("tcp", address, p) for p in service_ports]
            answering.append(("tcp", restore_host, feed.port))
            for host in (hosts.private, hosts.metadata, hosts.public):
                answering += [("tcp", host.address, 80), ("udp", host.address, 5353)]
            public = [("tcp", hosts.public.address, 80), ("udp", hosts.public.address, 5353)]
            targets += answering
            assert ("tcp", b_ip, 8080) in targets

            # Controls: from the host every one of these answers, so silence from inside
            # the workspace is the firewall's doing, not a dead target.
            controls = await asyncio.gather(*(asyncio.to_thread(_probe_here, t)
                                              for t in answering))
            assert all(c == "open" for c in controls), [c for c in controls if c != "open"]
            for user in ("", "0"):
                seen = await probe_from(docker, a, targets, user=user)
                reachable = sorted(t for t, r in seen.items() if r == "open")
                expected = sorted(public) if egress == "public" else []
                assert reachable == expected, (user or "coder", seen)
            # The workspace itself still works, and the gateway reaches both.
            code, out = await exec_in(docker, a, ["python3", "-c",
                                                  "import urllib.request as u; print(u.urlopen("
                                                  "'http://127.0.0.1:8080/healthz').status)"])
            assert (code, out.strip()) == (0, "200")
            for ws in ("a", "b"):
                upstream = await ctl.resolve_upstream(ws)
                assert await _http_status(upstream.host, upstream.port) == 200
    finally:
        gateway_port.close()
        udp.close()


def _probe_here(target: Target) -> str:
    proto, host, port = target
    try:
        if proto == "tcp":
            socket.create_connection((host, port), timeout=3).close()
            return "open"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(b"control", (host, port))
            return "open" if s.recvfrom(64)[0] else "silent"
    except OSError as exc:
        return f"{type(exc).__name__} {target}"


@pytest.mark.parametrize("stack", [("host", "public")], indirect=True, ids=["host"])
async def test_only_the_restore_helper_network_reaches_the_feed(
        stack: tuple[Stack, str], docker: aiodocker.Docker, docker_prefix: str,
        workspace_image: str) -> None:
    """The feed listens on the host's address on the restore network: a container on that
    network connects (a helper), a workspace does not."""
    made, _ = stack
    await made.controller.start("a", workspace_image,
                                await _volume(docker, f"{docker_prefix}-home-a"))
    host = await made.restore.own_address()

    async def nobody() -> str:
        return "0.0.0.0"

    async with FeedListener(host, nobody) as feed:
        target: Target = ("tcp", host, feed.port)
        seen = await probe_from(docker, f"{docker_prefix}-ws-a", [target])
        assert seen[target] != "open"
        helper = f"{docker_prefix}-helper"
        await docker.containers.create({
            "Image": workspace_image, "Entrypoint": ["sleep", "60"],
            "HostConfig": {"NetworkMode": made.restore.name}}, name=helper)
        await docker.containers.container(helper).start()
        seen = await probe_from(docker, helper, [target])
        assert seen[target] == "open"


async def test_workspaces_spread_over_several_networks_still_reach_nothing_of_each_other(
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str) -> None:
    """docker.networks > 1 (a bridge holds about a thousand workspaces): each workspace on
    the network its id hashes to; across networks as within one, nothing gets through."""
    firewall = Firewall()
    bridges = [BridgeNetwork(docker, f"{docker_prefix}-net-{i}", firewall=firewall,
                             egress="public") for i in range(3)]
    ctl = DockerInstanceController(docker=docker, network=bridges,
                                   name_prefix=f"{docker_prefix}-ws-", start_timeout=60,
                                   sandbox=Sandbox(memory_limit_bytes=256 << 20))
    try:
        ids = [f"w{i}" for i in range(6)]
        placed: dict[str, str] = {}
        for ws in ids:
            await ctl.start(ws, workspace_image,
                            await _volume(docker, f"{docker_prefix}-home-{ws}"))
            info = (await docker.containers.get(f"{docker_prefix}-ws-{ws}"))._container
            (placed[ws],) = list(info["NetworkSettings"]["Networks"])
            assert placed[ws] == ctl.bridge_for(ws).name
        assert len(set(placed.values())) >= 2, placed
        addresses = {ws: (await ctl.resolve_upstream(ws)).host for ws in ids}
        for ws in ids:  # the gateway reaches every one
            assert await _http_status(addresses[ws], 8080) == 200
        source = ids[0]
        targets: list[Target] = [("tcp", addresses[ws], 8080) for ws in ids[1:]]
        seen = await probe_from(docker, f"{docker_prefix}-ws-{source}", targets)
        assert all(r != "open" for r in seen.values()), seen
    finally:
        await ctl.close()


async def test_under_egress_public_the_hosts_resolvers_answer_on_port_53_and_nothing_else(
        docker: aiodocker.Docker, docker_prefix: str, workspace_image: str,
        hosts: NetnsHosts) -> None:
    """Docker's embedded DNS forwards a workspace's queries to the host's resolvers from the
    workspace's own namespace; a resolver in a private range (the usual case) stays
    reachable on port 53 only."""
    resolver = hosts.private.address
    bridge = BridgeNetwork(docker, f"{docker_prefix}-net", firewall=Firewall(),
                           egress="public", dns=(resolver,))
    ctl = DockerInstanceController(docker=docker, network=bridge,
                                   name_prefix=f"{docker_prefix}-ws-", start_timeout=60)
    try:
        await ctl.start("a", workspace_image, await _volume(docker, f"{docker_prefix}-home-a"))
        targets: list[Target] = [("udp", resolver, 53), ("udp", resolver, 5353),
                                 ("tcp", resolver, 80), ("udp", hosts.metadata.address, 53)]
        seen = await probe_from(docker, f"{docker_prefix}-ws-a", targets)
        assert [seen[t] == "open" for t in targets] == [True, False, False, False], seen
    finally:
        await ctl.close()
