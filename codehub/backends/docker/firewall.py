"""The host firewall that keeps workspaces apart: iptables rules per bridge network.

Docker's own rules let a container reach every other container on its bridge and every
address of the host (the host's INPUT chain never sees Docker's rules). The rules here,
one pair of chains per network of ours, close both holes and apply the egress policy:

- FORWARD (through `DOCKER-USER`, which Docker evaluates before its own rules and never
  rewrites): nothing between two members of one network (any protocol); nothing forwarded
  into a member from anywhere but as a reply; from a member to another interface only what
  the policy allows (`none`: nothing; `public`: every address outside NON_PUBLIC, plus the
  operator's `allow` list), the rest left to Docker (NAT for a non-internal network).
- INPUT (the host's own addresses, on any interface: the gateway, the admin API, the
  restore feed, PostgreSQL, Redis, a Docker API over TCP, ...): from a member only replies
  to connections the host opened (the gateway's proxied connections), except where a
  network's `host_ports` say otherwise (`"tcp"`: the restore network's helpers connect to
  the feed, which checks their address and token).

The host itself (the gateway runs in the host's network namespace, on the host or in a
container started with `--network host`) still reaches every member: its connections
leave through OUTPUT and their replies are ESTABLISHED.

Guarantees:
- `rules()` is pure: the same networks give the same text; each network's chains depend
  only on its own bridge interface, policy and allow list, and their rule count does not
  depend on how many containers the network has (O(1) per network).
- `Firewall.apply()` installs one network's chains atomically (iptables-restore: a
  network is never half-filtered) and hooks them into DOCKER-USER and INPUT once, by
  jumps that match the bridge interface (traffic of other interfaces, loopback included,
  costs one interface comparison per network); calling
  it again replaces the chains' contents. It uses the iptables variant (nft or legacy) in
  which Docker's DOCKER-USER chain lives, and raises PermanentError naming
  `docker.firewall` when it cannot (no iptables, no CAP_NET_ADMIN).
- `Firewall.prune()` removes chains of ours whose bridge interface no longer exists; a chain
  another process (a second replica, a parallel test) removes meanwhile is no error.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field

from ...interfaces import PermanentError

# Never reachable from a workspace under egress "public": RFC 6890 special-purpose ranges
# that are not the public internet (private, loopback, link-local with the cloud metadata
# address 169.254.169.254, CGNAT, benchmarking, multicast, reserved, broadcast).
NON_PUBLIC = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)
CHAIN_PREFIX = "CODEHUB-"
_IFACE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    """What the members of one bridge may reach. `egress`: "none" or "public". `allow`:
    CIDRs reachable despite NON_PUBLIC (an internal DNS resolver, a package mirror).
    `host_tcp`: members may open TCP connections to the host's address on this bridge
    (the restore network; never a workspace network). `dns`: resolvers reachable on port
    53 under egress "public" even in a blocked range (Docker's embedded DNS forwards a
    container's queries to the host's resolvers from the container's own namespace)."""

    interface: str
    egress: str = "none"
    allow: Sequence[str] = field(default_factory=tuple)
    host_tcp: str = ""
    dns: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _IFACE.match(self.interface):
            raise ValueError(f"invalid interface name {self.interface!r}")
        if self.egress not in ("none", "public"):
            raise ValueError(f"invalid egress {self.egress!r}")


def host_resolvers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """The IPv4 name servers of this host's resolv.conf, loopback ones left out (Docker
    reaches those from the host's own namespace, not through the bridge)."""
    found = []
    try:
        with open(path) as conf:
            for line in conf:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    try:
                        address = ipaddress.IPv4Address(parts[1])
                    except ValueError:
                        continue
                    if not address.is_loopback:
                        found.append(str(address))
    except OSError:
        return ()
    return tuple(found)


def chain_names(interface: str) -> tuple[str, str]:
    """(forward chain, input chain) of the network whose bridge is `interface`."""
    tag = hashlib.sha256(interface.encode()).hexdigest()[:12]
    return f"{CHAIN_PREFIX}F-{tag}", f"{CHAIN_PREFIX}I-{tag}"


def rules(policy: NetworkPolicy) -> str:
    """iptables-restore input (for --noflush) that (re)fills this network's two chains."""
    fwd, inp = chain_names(policy.interface)
    br = policy.interface
    lines = ["*filter", f":{fwd} - [0:0]", f":{inp} - [0:0]",
             f"-A {fwd} -i {br} -o {br} -j DROP",
             f"-A {fwd} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
             f"-A {fwd} -o {br} -j DROP"]
    if policy.egress == "public":
        lines += [f"-A {fwd} -i {br} -d {cidr} -j RETURN" for cidr in policy.allow]
        lines += [f"-A {fwd} -i {br} -d {ip} -p {proto} --dport 53 -j RETURN"
                  for ip in policy.dns for proto in ("udp", "tcp")]
        lines += [f"-A {fwd} -i {br} -d {cidr} -j DROP" for cidr in NON_PUBLIC]
        lines.append(f"-A {fwd} -i {br} -j RETURN")
    else:
        lines.append(f"-A {fwd} -i {br} -j DROP")
    lines.append(f"-A {inp} -i {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    if policy.host_tcp:
        lines.append(f"-A {inp} -i {br} -d {policy.host_tcp} -p tcp -j RETURN")
    lines += [f"-A {inp} -i {br} -j DROP", "COMMIT", ""]
    return "\n".join(lines)


def _hooks(interface: str) -> list[tuple[str, str, str]]:
    """(base chain, interface match, our chain) of the jumps into a network's chains."""
    fwd, inp = chain_names(interface)
    return [("DOCKER-USER", "-i", fwd), ("DOCKER-USER", "-o", fwd), ("INPUT", "-i", inp)]


class Firewall:
    """Applies `rules()` with the host's iptables. One instance per process is enough."""

    def __init__(self) -> None:
        self._variant: str | None = None
        self._lock = asyncio.Lock()

    async def apply(self, policy: NetworkPolicy) -> None:
        """Also prunes what removed networks left behind."""
        await self.prune()
        async with self._lock:
            variant = await self._find_variant()
            await self._run(f"{variant}-restore", "--noflush", stdin=rules(policy))
            for hook, match, chain in _hooks(policy.interface):
                # The jump matches the interface itself: other traffic (loopback, other
                # bridges) costs one interface comparison per network, nothing more.
                if await self._try(variant, "-C", hook, match, policy.interface, "-j", chain):
                    continue
                await self._run(variant, "-I", hook, "1", match, policy.interface, "-j", chain)

    async def prune(self) -> list[str]:
        """Remove our chains whose bridge is gone; returns their names."""
        async with self._lock:
            variant = await self._find_variant()
            listing = await self._run(variant, "-S")
            gone: list[str] = []
            for line in listing.splitlines():
                match = re.match(rf"^-N ({CHAIN_PREFIX}F-[0-9a-f]{{12}})$", line)
                if match is None:
                    continue
                fwd = match.group(1)
                try:
                    body = await self._run(variant, "-S", fwd)
                except PermanentError:  # removed meanwhile by another process's prune
                    continue
                iface = re.search(r" -i (\S+) -o ", body)
                if iface is not None and await asyncio.to_thread(
                        os.path.exists, f"/sys/class/net/{iface.group(1)}"):
                    continue
                gone.append(fwd)
            for fwd in gone:
                inp = fwd.replace("-F-", "-I-", 1)
                for chain, hook in ((fwd, "DOCKER-USER"), (inp, "INPUT")):
                    for line in (await self._run(variant, "-S", hook)).splitlines():
                        if line.startswith(f"-A {hook} ") and line.endswith(f" -j {chain}"):
                            await self._try(variant, "-D", *line.split()[1:])
                    await self._try(variant, "-F", chain)
                    await self._try(variant, "-X", chain)
            return gone

    async def _find_variant(self) -> str:
        """The iptables whose tables hold Docker's DOCKER-USER chain (nft or legacy)."""
        if self._variant is not None:
            return self._variant
        candidates = [c for c in ("iptables", "iptables-nft", "iptables-legacy")
                      if shutil.which(c)]
        if not candidates:
            raise PermanentError(
                "docker.firewall = iptables: no iptables binary found (install iptables, or "
                "set docker.firewall = off and isolate workspaces yourself)")
        for candidate in candidates:
            if await self._try(candidate, "-S", "DOCKER-USER"):
                self._variant = candidate
                return candidate
        raise PermanentError(
            "docker.firewall = iptables: Docker's DOCKER-USER chain is in none of "
            f"{', '.join(candidates)} (is this process in the Docker host's network "
            "namespace with CAP_NET_ADMIN: root on the host, or a container run with "
            "--network host --cap-add NET_ADMIN?)")

    async def _try(self, *argv: str) -> bool:
        try:
            await self._run(*argv)
        except PermanentError:
            return False
        return True

    @staticmethod
    async def _run(*argv: str, stdin: str | None = None) -> str:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        except OSError as exc:
            raise PermanentError(f"docker.firewall = iptables: cannot run {argv[0]}: "
                                 f"{exc}") from exc
        out, err = await proc.communicate(stdin.encode() if stdin is not None else None)
        if proc.returncode != 0:
            raise PermanentError(f"docker.firewall = iptables: {' '.join(argv)} failed "
                                 f"({proc.returncode}): {err.decode(errors='replace').strip()}")
        return out.decode(errors="replace")
