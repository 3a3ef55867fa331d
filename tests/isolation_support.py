"""Playing a workspace user against the real engine: probes run inside a workspace, and
test hosts in network namespaces that only this machine has.

Every probe goes to an address of this machine: a container of the test's own, an
address of the host, or a namespace made here (a "private" host in 10.0.0.0/8, a cloud
metadata stand-in at 169.254.169.254 and a "public" host in TEST-NET-3). Each is bounded
(one connection or datagram per target, 1.5 s) and everything made is removed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import random
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import aiodocker

PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor

def probe(target):
    proto, host, port = target
    try:
        if proto == "tcp":
            socket.create_connection((host, port), timeout=1.5).close()
            return "open"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(1.5)
        s.sendto(b"codehub-probe", (host, port))
        return "open" if s.recvfrom(64)[0] else "silent"
    except Exception as exc:
        return type(exc).__name__

targets = json.loads(sys.argv[1])
with ThreadPoolExecutor(64) as pool:
    print(json.dumps(list(pool.map(probe, [tuple(t) for t in targets]))))
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""

Target = tuple[str, str, int]


async def exec_in(docker: aiodocker.Docker, container: str, argv: Sequence[str],
                  user: str = "") -> tuple[int, str]:
    run = await docker.containers.container(container).exec(list(argv), user=user)
    out = b""
    async with run.start(detach=False) as stream:
        while (msg := await stream.read_out()) is not None:
            out += msg.data
    return int((await run.inspect())["ExitCode"]), out.decode(errors="replace")


async def probe_from(docker: aiodocker.Docker, container: str, targets: Sequence[Target],
                     user: str = "") -> dict[Target, str]:
    """What each target answered from inside `container` ("open" or the error's name)."""
    code, out = await exec_in(docker, container,
                              ["python3", "-c", PROBE, json.dumps(list(targets))], user=user)
    assert code == 0, out
    return dict(zip(targets, json.loads(out.strip().splitlines()[-1]), strict=True))


async def start_udp_echo(docker: aiodocker.Docker, container: str, port: int) -> None:
    run = await docker.containers.container(container).exec(
        ["python3", "-c", UDP_ECHO, str(port)])
    await run.start(detach=True)


async def listening_tcp_ports(docker: aiodocker.Docker, container: str) -> list[int]:
    """The TCP ports the container listens on at an address other containers could
    reach."""
    code, out = await exec_in(docker, container, ["cat", "/proc/net/tcp"])
    assert code == 0, out
    ports = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":  # LISTEN
            address, port = fields[1].split(":")
            if not address.endswith("7F"):  # bound to 127.x (Docker's DNS): not reachable
                ports.add(int(port, 16))
    return sorted(ports)


def host_ipv4_addresses(own: NetnsHosts | None = None) -> list[str]:
    """Every IPv4 address of the host but loopback's, leaving out the host side of the
    namespace hosts other tests made (`chh…` veths that are not `own`'s): a parallel
    test removes them at any time, and its TEST-NET-3 address then stands for the public
    internet, which egress "public" rightly reaches."""
    ours = set() if own is None else {h.host_side for h in (own.private, own.metadata,
                                                             own.public)}
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    found = []
    for line in out.splitlines():
        fields = line.split()
        interface, address = fields[1].split("@")[0], fields[3].split("/")[0]
        if interface.startswith("chh") and interface not in ours:
            continue
        if not address.startswith("127."):
            found.append(address)
    return found


class HostUdpEcho:
    """A UDP echo server of the test process on 0.0.0.0 (a host service on all
    interfaces)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("0.0.0.0", 0))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.5)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(64)
            except OSError:
                continue
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@dataclass
class NetnsHost:
    """A host in a network namespace of its own, behind a veth pair, serving HTTP on port
    80 (and UDP echo on 5353 and 53) at `address`."""

    name: str
    address: str
    host_side: str
    servers: list[subprocess.Popen[bytes]]


def _sh(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)


def _wait_listening(address: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def make_netns_host(address: str, peer: str, prefix_len: int = 30) -> NetnsHost:
    tag = uuid.uuid4().hex[:6]
    name, veth_host, veth_ns = f"chns-{tag}", f"chh{tag}", f"chn{tag}"
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
        _sh("ip", "link", "set", veth_ns, "netns", name)
        _sh("ip", "addr", "add", f"{peer}/{prefix_len}", "dev", veth_host)
        _sh("ip", "link", "set", veth_host, "up")
        ns = ("ip", "netns", "exec", name)
        _sh(*ns, "ip", "addr", "add", f"{address}/{prefix_len}", "dev", veth_ns)
        _sh(*ns, "ip", "link", "set", veth_ns, "up")
        _sh(*ns, "ip", "link", "set", "lo", "up")
        _sh(*ns, "ip", "route", "add", "default", "via", peer)
        servers = [
            subprocess.Popen([*ns, "python3", "-m", "http.server", "--bind", address, "80"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([*ns, "python3", "-c", UDP_ECHO, "5353"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([*ns, "python3", "-c", UDP_ECHO, "53"],  # a "resolver"
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        _wait_listening(address, 80)
    except BaseException:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True)
        raise
    return NetnsHost(name, address, veth_host, servers)


def remove_netns_host(host: NetnsHost) -> None:
    for server in host.servers:
        server.kill()
        server.wait(5)
    subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
    subprocess.run(["ip", "link", "del", host.host_side], capture_output=True)


@dataclass
class NetnsHosts:
    private: NetnsHost   # 10.x: a private range
    metadata: NetnsHost  # 169.254.169.254: the cloud metadata address
    public: NetnsHost    # 203.0.113.x (TEST-NET-3): stands for the public internet


def netns_test_hosts() -> Iterator[NetnsHosts]:
    """The three namespace hosts (a generator for a fixture), at random addresses where
    the range allows, so two runs on one machine do not collide, and never on a subnet
    holding an address this machine already uses (its registries' proxy may well sit in
    TEST-NET-3: a /30 over it would cut the run off from it)."""
    in_use = addresses_in_use()
    made: list[NetnsHost] = []
    try:
        made.append(make_netns_host(*_free_slash30("10.231.{}.{}", range(256), in_use)))
        made.append(make_netns_host("169.254.169.254", "169.254.169.253", 30))
        made.append(make_netns_host(*_free_slash30("203.0.113.{}", range(1, 63), in_use)))
        yield NetnsHosts(*made)
    finally:
        for host in made:
            remove_netns_host(host)


# Names whose addresses a run needs to keep reaching (the package registries, used by
# scripts/build-gateway-image and the benches' installs, resolve here to a proxy).
NEEDED_HOSTS = ("pypi.org", "files.pythonhosted.org", "deb.debian.org", "registry.npmjs.org")


def addresses_in_use() -> set[ipaddress.IPv4Address]:
    """IPv4 addresses this machine talks to or holds: the resolvers, the registries'
    addresses, every address and route gateway of its interfaces."""
    found: set[str] = set()
    with contextlib.suppress(OSError), open("/etc/resolv.conf") as conf:
        found.update(m for line in conf for m in re.findall(r"^nameserver\s+(\S+)", line))
    for name in NEEDED_HOSTS:
        with contextlib.suppress(OSError):
            found.update(str(info[4][0]) for info in socket.getaddrinfo(name, None, socket.AF_INET))
    for cmd in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        found.update(re.findall(r"(?:inet|via|src)\s+(\d+\.\d+\.\d+\.\d+)", out))
    addresses = set()
    for text in found:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv4Address):
            addresses.add(address)
    return addresses


def _free_slash30(pattern: str, choices: range,
                  in_use: set[ipaddress.IPv4Address]) -> tuple[str, str]:
    """(address, peer) of a random /30 from `pattern` ("a.b.{}.{}" takes a third octet
    and the host's last one; "a.b.c.{}" the /30's index) that holds no address in use."""
    options = list(choices)
    random.shuffle(options)
    for n in options:
        if pattern.count("{}") == 2:
            base = ipaddress.ip_address(pattern.format(n, 0))
        else:
            base = ipaddress.ip_address(pattern.format(4 * n))
        net = ipaddress.ip_network(f"{base}/30")
        if not any(address in net for address in in_use):
            return str(base + 2), str(base + 1)
    raise RuntimeError(f"no free /30 in {pattern} (in use: {sorted(in_use)})")
