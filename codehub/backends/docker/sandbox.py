"""What a workspace container may do: the least privilege code-server needs.

code-server (and the images shaped like it: user `coder`, uid 1000, home /home/coder) runs
as an ordinary user and needs no capability at all, so every one is dropped by default;
`no-new-privileges` makes setuid/setgid bits and file capabilities inert (a root-owned
4755 shell in a home runs as its caller), a pids limit stops a fork bomb inside the
container, the root file system is read-only with a private size-limited /tmp (tmpfs,
nosuid, nodev), and memory (no swap beyond it) and CPU are capped. `docker exec -u 0`
into such a container is root without capabilities: it can read and write what uid 0
owns in the container and nothing else.

Guarantees:
- `host_config()` is pure: the same Sandbox gives the same HostConfig fragment, and
  `spec()` changes whenever any field does (so a running container made under other
  settings is replaced at its next start).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ...constants import DOCKER_DEFAULT_CAPABILITIES


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Limits of one workspace container. None or 0 for memory/cpus/pids: no limit."""

    memory_limit_bytes: int | None = None
    cpu_limit: float | None = None
    pids_limit: int | None = 1024
    cap_add: tuple[str, ...] = field(default_factory=tuple)
    read_only_root: bool = True
    tmp_size_bytes: int = 512 << 20

    def __post_init__(self) -> None:
        for cap in self.cap_add:
            if cap not in DOCKER_DEFAULT_CAPABILITIES:
                raise ValueError(f"capability {cap!r} is not one of Docker's default set "
                                 f"({', '.join(DOCKER_DEFAULT_CAPABILITIES)})")

    def spec(self) -> dict[str, Any]:
        """What identifies these settings in a container's spec hash."""
        out = asdict(self)
        out["cap_add"] = list(self.cap_add)
        return out

    def host_config(self) -> dict[str, Any]:
        host: dict[str, Any] = {
            "CapDrop": ["ALL"],
            "CapAdd": list(self.cap_add),
            "SecurityOpt": ["no-new-privileges"],
            "ReadonlyRootfs": self.read_only_root,
        }
        if self.read_only_root:
            host["Tmpfs"] = {"/tmp": f"rw,nosuid,nodev,size={self.tmp_size_bytes},mode=1777"}
        if self.pids_limit:
            host["PidsLimit"] = self.pids_limit
        if self.memory_limit_bytes:
            host["Memory"] = self.memory_limit_bytes
            host["MemorySwap"] = self.memory_limit_bytes  # no swap beyond the limit
        if self.cpu_limit:
            host["NanoCpus"] = int(self.cpu_limit * 1e9)
        return host
