"""Names and numbers shared between modules and replicas: one place, so they never drift."""

from __future__ import annotations

# pg advisory lock keys (bigint). Distinct so migrating never blocks on the leader.
MIGRATION_LOCK_ID = 0x636F6465_6875_0001  # "codehu" + 1
LEADER_LOCK_ID = 0x636F6465_6875_0002

# Redis pub/sub channel carrying workspace ids whose desired_state changed.
HINT_CHANNEL = "codehub:hints"

# Labels on every Docker object CodeHub creates; orphan detection only touches these.
LABEL_MANAGED_BY = "codehub.managed-by"
LABEL_MANAGED_BY_VALUE = "codehub"
LABEL_WORKSPACE_ID = "codehub.workspace-id"
LABEL_ROLE = "codehub.role"  # workspace container, home volume, storage helper
ROLE_WORKSPACE = "workspace"  # the object that runs a workspace (a container)
ROLE_HOME = "home"  # a workspace's home volume
LABEL_RESTORED_FROM = "codehub.restored-from-sha256"  # on a home made by a restore

# Archive object layout in the bucket.
ARCHIVE_NAME = "home.tar.gz"
META_SUFFIX = ".meta"
ARCHIVE_FORMAT = "tar+gzip"


def archive_key(workspace_id: str) -> str:
    return f"{workspace_id}/{ARCHIVE_NAME}"

# Docker's default capability set: all a workspace may be given back (docker.cap_add)
# after every capability is dropped.
DOCKER_DEFAULT_CAPABILITIES = (
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "NET_RAW", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
)
