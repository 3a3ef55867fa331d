"""Size-limited homes: an ext4 file system per home volume, in a sparse image file on the
Docker host, loop-mounted `nosuid,nodev`; the Docker volume is a bind of that mount.

Docker's `local` volumes have no size limit on ext4 or overlay2 hosts (its `size` option
needs XFS project quotas), so a workspace would see the host's whole free disk. Here each
home is a file system of its own: writing past the limit fails inside the workspace with
ENOSPC and touches nobody else's space; the image is sparse, so a home costs the blocks it
uses, not its limit. The mount points live under `mount_dir` (default `/run/codehub/homes`:
a tmpfs on a systemd host, empty after a reboot) and every user of a volume asks
`ensure_mounted()` first, so a container never starts on the empty mount point of a home
whose file system is not mounted.

Commands run in the Docker engine's mount namespace: directly when this process is root
there (the gateway on the host), else through a short-lived helper container that enters
dockerd's mount namespace with nsenter (the gateway in a container; it holds the engine's
socket, which is root on the host already). The helper gets what setns, mount and the loop
devices need (SYS_ADMIN, SYS_PTRACE, the loop device nodes), not --privileged.

Guarantees:
- `create()` is idempotent and crash-safe: the image is formatted under a temporary name
  and renamed into place, then mounted when not mounted; a re-run after a crash at any
  line finishes the job. The new file system's root belongs to `owner`.
- `ensure_mounted()` mounts an existing image and raises PermanentError when the image
  is missing (never an empty home).
- `remove()` unmounts and deletes the image; a missing one is fine.
- Names are checked before any command runs.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Any

import aiodocker

from ...constants import LABEL_MANAGED_BY, LABEL_MANAGED_BY_VALUE, LABEL_ROLE
from ...interfaces import AdapterError, PermanentError
from .engine import TRANSPORT_ERRORS, docker_failure, ensure_image, remove_container

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
_PATH = re.compile(r"^/[A-Za-z0-9_./-]+$")
ROLE_DISK_HELPER = "disk-helper"
_MOUNT_OPTIONS = "loop,nosuid,nodev"

_CREATE = f"""set -eu
img="$1/$3.img"; mnt="$2/$3"
mkdir -p "$1" "$mnt"
fresh=0
if [ ! -e "$img" ]; then
  rm -f "$img.new"
  truncate -s "$4" "$img.new"
  mkfs.ext4 -q -F -m 0 -E root_owner="$5" "$img.new"
  mv "$img.new" "$img"
  fresh=1
fi
mountpoint -q "$mnt" || mount -o {_MOUNT_OPTIONS} "$img" "$mnt"
if [ "$fresh" = 1 ]; then rmdir "$mnt/lost+found" 2>/dev/null || true; fi
"""
_ENSURE = f"""set -eu
img="$1/$3.img"; mnt="$2/$3"
[ -e "$img" ] || {{ echo "home image $img is missing" >&2; exit 3; }}
mkdir -p "$mnt"
mountpoint -q "$mnt" || mount -o {_MOUNT_OPTIONS} "$img" "$mnt"
"""
# The helper's own program: find dockerd (its mount namespace is where Docker resolves
# the volume's bind) among the host's processes and run the script there.
_ENTER_DOCKERD = """set -eu
for p in /proc/[0-9]*; do
  if [ "$(cat "$p/comm" 2>/dev/null)" = dockerd ]; then pid=${p#/proc/}; break; fi
done
[ -n "${pid:-}" ] || { echo "no dockerd among the host's processes" >&2; exit 1; }
script=$1; shift
exec nsenter --target "$pid" --mount -- sh -c "$script" sh "$@"
"""
_REMOVE = """set -eu
img="$1/$3.img"; mnt="$2/$3"
if mountpoint -q "$mnt"; then umount "$mnt"; fi
rmdir "$mnt" 2>/dev/null || true
rm -f "$img" "$img.new"
"""


@dataclass(frozen=True, slots=True)
class DiskLayout:
    """Where images and mount points live on the Docker host."""

    image_dir: str = "/var/lib/codehub/homes"
    mount_dir: str = "/run/codehub/homes"

    def __post_init__(self) -> None:
        for path in (self.image_dir, self.mount_dir):
            if not _PATH.match(path) or ".." in path.split("/"):
                raise ValueError(f"invalid host path {path!r}")


class HomeDisks:
    """One loop-mounted ext4 file system per home volume."""

    def __init__(self, docker: aiodocker.Docker, *, helper_image: str, local: bool,
                 layout: DiskLayout | None = None) -> None:
        """`local`: this process is root in the mount namespace of the Docker host (the
        gateway on the host) and runs the commands itself; else a helper does."""
        self._docker = docker
        self._helper_image = helper_image
        self.layout = layout or DiskLayout()
        self._local = local
        self._lock = asyncio.Lock()

    def mount_point(self, volume: str) -> str:
        _check(volume)
        return f"{self.layout.mount_dir}/{volume}"

    def volume_options(self, volume: str) -> dict[str, str]:
        """DriverOpts of the `local` Docker volume that binds the mounted home."""
        return {"type": "none", "o": "bind", "device": self.mount_point(volume)}

    async def create(self, volume: str, size_bytes: int, owner: tuple[int, int]) -> None:
        if size_bytes < 16 << 20:
            raise PermanentError(f"a home of {size_bytes} bytes is too small (16 MiB at least)")
        await self._run(_CREATE, volume, str(size_bytes), f"{owner[0]}:{owner[1]}")

    async def ensure_mounted(self, volume: str) -> None:
        await self._run(_ENSURE, volume)

    async def remove(self, volume: str) -> None:
        await self._run(_REMOVE, volume)

    async def _run(self, script: str, volume: str, *extra: str) -> None:
        _check(volume)
        args = (self.layout.image_dir, self.layout.mount_dir, volume, *extra)
        if self._local:
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", script, "sh", *args, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            out, _ = await proc.communicate()
            code, text = proc.returncode, out.decode(errors="replace").strip()
        else:
            code, text = await self._run_in_helper(script, volume, args)
        if code == 3:
            raise PermanentError(f"home of {volume}: {text}")
        if code != 0:
            raise AdapterError(f"home disk of {volume}: exit {code}: {text[-2000:]}")

    async def _run_in_helper(self, script: str, volume: str, args: tuple[str, ...]
                             ) -> tuple[int, str]:
        name = f"{volume}-disk"
        config: dict[str, Any] = {
            "Image": self._helper_image,
            "Entrypoint": ["sh", "-c", _ENTER_DOCKERD, "sh", script, *args],
            "User": "0:0",
            "Labels": {LABEL_MANAGED_BY: LABEL_MANAGED_BY_VALUE, LABEL_ROLE: ROLE_DISK_HELPER},
            # Not --privileged (which asks for every capability, some engines may not
            # hold): what setns, mount and the loop devices need, nothing else.
            "HostConfig": {
                "PidMode": "host", "NetworkMode": "none", "CapDrop": ["ALL"],
                "CapAdd": ["SYS_ADMIN", "SYS_PTRACE", "SYS_CHROOT", "DAC_OVERRIDE", "CHOWN",
                           "FOWNER", "MKNOD"],
                "DeviceCgroupRules": ["c 10:237 rwm", "b 7:* rwm"],
                "SecurityOpt": ["seccomp=unconfined", "apparmor=unconfined"],
            },
        }
        async with self._lock:  # one helper at a time (they are named after the volume)
            try:
                await ensure_image(self._docker, self._helper_image)
                await remove_container(self._docker, name)
                container = await self._docker.containers.create(config, name=name)
                try:
                    await container.start()
                    status = await container.wait(timeout=300)
                    logs = await container.log(stdout=True, stderr=True)
                finally:
                    await container.delete(force=True)
            except TRANSPORT_ERRORS as exc:
                raise docker_failure(f"running the disk helper of {volume}", exc) from exc
        return int(status.get("StatusCode", 1)), "".join(logs).strip()


def _check(volume: str) -> None:
    if not _NAME.match(volume):
        raise PermanentError(f"invalid volume name {volume!r}")
