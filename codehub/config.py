"""Settings: a TOML file plus environment overrides, parsed into frozen dataclasses.

Guarantees:
- Parsing and validation happen here and nowhere else. Every other module receives typed,
  already-valid values.
- Every setting is one dataclass field with a default and a `doc`; `config.example.toml`
  is generated from these fields (`codehub config example`), so it cannot drift.
- Any bad input raises `ConfigError` whose message names the key (`section.key`) and what
  is wrong with it: an unknown key, a wrong type, a value out of range.
- Environment variables override the file: `CODEHUB_<SECTION>__<KEY>` (for example
  `CODEHUB_SERVER__PORT=9000`, `CODEHUB_DATABASE__URL=postgresql://…`), and `CODEHUB_<KEY>`
  for top-level keys (`CODEHUB_DATA_DIR`); a table inside a section doubles the separator
  again (`CODEHUB_AUTH__OIDC__ISSUER`). Lists in the environment are comma-separated.
- A section left out entirely (or an empty URL) selects the embedded default for it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .constants import DOCKER_DEFAULT_CAPABILITIES

ENV_PREFIX = "CODEHUB_"


class ConfigError(Exception):
    """A setting is wrong. The message is one line naming the key."""


def setting(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
            choices: tuple[str, ...] | None = None, secret: bool = False,
            check: Callable[[Any], str | None] | None = None) -> Any:
    """Declare one setting: its default, its documentation and its valid range. `check`
    returns what is wrong with a value (None: nothing)."""
    meta = {"doc": doc, "lo": lo, "hi": hi, "choices": choices, "secret": secret,
            "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _capabilities(value: list[str]) -> str | None:
    bad = [c for c in value if c not in DOCKER_DEFAULT_CAPABILITIES]
    return (f"{', '.join(map(repr, bad))} not in Docker's default set "
            f"({', '.join(DOCKER_DEFAULT_CAPABILITIES)})") if bad else None


def _uid_gid(value: str) -> tuple[int, int] | None:
    uid, sep, gid = value.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        return None
    return int(uid), int(gid)


def home_owner(value: str) -> tuple[int, int]:
    """docker.home_owner as numbers (already checked)."""
    parsed = _uid_gid(value)
    assert parsed is not None
    return parsed


_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_WORKSPACE_HOST = re.compile(rf"\{{id\}}((?:\.{_LABEL})+)(:[0-9]{{1,5}})?")


def _workspace_host(value: str) -> str | None:
    if not value:
        return None
    m = _WORKSPACE_HOST.fullmatch(value)
    if m is None or (m.group(2) and not 0 < int(m.group(2)[1:]) < 65536):
        return ("expected {id} followed by a lower-case domain and an optional port, "
                f"e.g. {{id}}.ws.example.com or {{id}}.ws.localhost:8000; got {value!r}")
    return None


def _networks(parse: Callable[[str], object], what: str,
              ) -> Callable[[list[str]], str | None]:
    def check(value: list[str]) -> str | None:
        for cidr in value:
            try:
                parse(cidr)
            except ValueError as exc:
                return f"{cidr!r} is not an {what} network: {exc}"
        return None
    return check


_ip_networks = _networks(ipaddress.ip_network, "IP")
_ipv4_networks = _networks(ipaddress.IPv4Network, "IPv4")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The HTTP listener."""

    host: str = setting("127.0.0.1", "Address to listen on. 0.0.0.0 for all interfaces.")
    port: int = setting(8000, "TCP port to listen on.", lo=1, hi=65535)
    shutdown_timeout: float = setting(
        8.0, "Seconds in-flight requests get to finish after SIGTERM/SIGINT.", lo=0, hi=600)
    public_url: str = setting(
        "", "Base URL users reach CodeHub at (for access links). Empty: derived from requests.")


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """PostgreSQL. Empty url: an embedded PostgreSQL under data_dir/postgres."""

    url: str = setting("", "postgresql://user:pass@host:port/db. Empty: embedded server.",
                       secret=True)
    pool_min: int = setting(1, "Connections kept open in the pool.", lo=0, hi=1000)
    pool_max: int = setting(10, "Most connections the pool opens.", lo=1, hi=1000)
    connect_timeout: float = setting(
        30.0, "Seconds to keep retrying an unreachable database at start-up before exiting "
        "with code 3.", lo=0, hi=3600)
    statement_timeout: float = setting(
        1.5, "Seconds a request waits on the database (pool acquire plus query) before it "
        "is treated as unavailable: the API and wake-ups answer 503, the gateway serves "
        "the last known routes. Bounds how long a hung database can hold a request.",
        lo=0.1, hi=600)


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Redis carries hints between replicas. Empty url: an in-process hint bus (one replica)."""

    url: str = setting("", "redis://host:port/db. Empty: in-process hint bus.", secret=True)


@dataclass(frozen=True, slots=True)
class S3Config:
    """Object storage for COLD archives. Empty endpoint_url: a local directory under
    data_dir/objects."""

    endpoint_url: str = setting("", "S3/MinIO endpoint URL. Empty: local-directory store.")
    region: str = setting("us-east-1", "S3 region.")
    access_key_id: str = setting("", "S3 access key id.", secret=True)
    secret_access_key: str = setting("", "S3 secret access key.", secret=True)
    bucket: str = setting("codehub-archives", "Bucket for archives (created if missing).")
    part_size_mib: int = setting(16, "Multipart upload part size in MiB.", lo=5, hi=5120)


@dataclass(frozen=True, slots=True)
class DockerConfig:
    """The Docker engine that runs workspaces (the one prerequisite)."""

    url: str = setting("", "Docker API URL. Empty: DOCKER_HOST or /var/run/docker.sock.")
    network: str = setting("codehub-workspaces", "Bridge network the workspaces join.")
    container_prefix: str = setting("codehub-ws-", "Workspace containers are named "
                                    "<container_prefix><workspace id>.")
    volume_prefix: str = setting("codehub-home-", "Home volumes are named "
                                 "<volume_prefix><workspace id>[-r<archive sha>].")
    workspace_image: str = setting(
        "codercom/code-server:latest", "Image of a new workspace unless the API names one.")
    command: list[str] = setting(
        ["--auth", "none", "--bind-addr", "0.0.0.0:8080"],
        "Arguments given to the workspace image (code-server's).")
    port: int = setting(8080, "Port the workspace serves HTTP and WebSocket on.", lo=1, hi=65535)
    health_path: str = setting("/healthz", "Health-check path inside the workspace.")
    memory_limit_mib: int = setting(2048, "Memory limit per workspace in MiB (0 = none).",
                                    lo=0, hi=1 << 20)
    cpu_limit: float = setting(1.0, "CPU limit per workspace in cores (0 = none).", lo=0, hi=1024)
    start_timeout: float = setting(120.0, "Seconds a workspace gets to pass its health check.",
                                   lo=1, hi=3600)
    gateway_container: str = setting(
        "", "Name of the gateway's own container, when it runs in one. It must run with "
        "--network host (and --cap-add NET_ADMIN for the firewall); CodeHub checks and "
        "refuses to start workspaces otherwise.")
    networks: int = setting(
        1, "Bridge networks the workspaces are spread over (by a hash of their id), named "
        "<network> when 1, else <network>-0 ... A Linux bridge takes at most 1,024 ports: "
        "plan one network per ~900 workspaces.", lo=1, hi=1000)
    egress: str = setting(
        "public", "What a workspace reaches outside its container. public: public addresses "
        "only, through NAT (git clone, pip and npm work; private, loopback, link-local with "
        "the metadata address, CGNAT and multicast ranges and the host stay unreachable). "
        "none: nothing (an internal network).", choices=("public", "none"))
    egress_allow: list[str] = setting(
        [], "IPv4 networks (CIDR) a workspace may reach despite egress = public's blocked "
        "ranges: an internal DNS resolver, a package mirror or proxy.", check=_ipv4_networks)
    firewall: str = setting(
        "iptables", "How workspaces are kept from each other, the host and private ranges. "
        "iptables: chains of CodeHub's in the host's DOCKER-USER and INPUT chains (needs "
        "root or CAP_NET_ADMIN in the host's network namespace). off: not at all (only for "
        "a single trusted user, or where the operator enforces the same rules).",
        choices=("iptables", "off"))
    pids_limit: int = setting(
        1024, "Processes and threads per workspace (a fork bomb stops here; 0 = none).",
        lo=0, hi=4 << 20)
    cap_add: list[str] = setting(
        [], "Capabilities given back to workspaces after all are dropped (code-server needs "
        "none).", check=_capabilities)
    read_only_root: bool = setting(
        True, "Workspaces get a read-only root file system and a private /tmp (tmpfs).")
    tmp_size_mib: int = setting(512, "Size of a workspace's /tmp in MiB (counts towards its "
                                     "memory).", lo=1, hi=1 << 20)
    home_size_limit_mib: int = setting(
        10240, "Size of each home in MiB: its own ext4 file system in a sparse image file, "
        "loop-mounted nosuid,nodev (writing past it fails with ENOSPC inside the "
        "workspace; a restore whose files add up to more ends in ERROR, the archive kept). "
        "0: plain Docker volumes without a limit. Per workspace: the API's "
        "home_size_limit_mib.", lo=0, hi=1 << 30,
        check=lambda v: None if v == 0 or v >= 16 else "must be 0 or at least 16")
    home_image_dir: str = setting(
        "/var/lib/codehub/homes", "Directory on the Docker host for the homes' image files.",
        check=lambda v: None if v.startswith("/") else "must be an absolute path")
    home_mount_dir: str = setting(
        "/run/codehub/homes", "Directory on the Docker host where homes are mounted (best "
        "on a tmpfs: empty after a reboot).",
        check=lambda v: None if v.startswith("/") else "must be an absolute path")
    home_owner: str = setting(
        "1000:1000", "uid:gid of the workspace user (code-server's coder): owner of every "
        "restored file.", check=lambda v: None if _uid_gid(v) else "expected uid:gid")


@dataclass(frozen=True, slots=True)
class ArchiveConfig:
    """How homes are archived."""

    compression_level: int = setting(1, "gzip level for archives (1 = fastest).", lo=0, hi=9)
    helper_image: str = setting(
        "", "Image for created-never-started helper containers that mount a volume for "
        "archive/restore (nothing runs in it; it must be present on the engine). Empty: "
        "docker.workspace_image.")
    restore_with: str = setting(
        "tar", "How a restore fills the new volume. tar: GNU tar (bash and tar from "
        "helper_image, as root, no network but a bridge `<docker.network>-restore` that "
        "only helpers join, read-only root, few capabilities) reads the verified stream "
        "from this process over a one-time authenticated TCP connection; dockerd is not "
        "in the data path (~1.5x faster). put-archive: Docker's archive API; nothing "
        "runs in any image.", choices=("tar", "put-archive"))


@dataclass(frozen=True, slots=True)
class ReconcilerConfig:
    """The leader's control loop."""

    enabled: bool = setting(True, "Campaign for leadership and reconcile in this replica.")
    workers: int = setting(4, "Workspaces reconciled concurrently.", lo=1, hi=256)
    resync_interval: float = setting(
        30.0, "Seconds between enqueuing every non-converged workspace.", lo=0.1, hi=86400)
    ttl_sweep_interval: float = setting(30.0, "Seconds between TTL sweeps.", lo=0.1, hi=86400)
    default_warm_ttl: int = setting(
        1800, "Idle seconds before RUNNING steps down to WARM (per-workspace overridable).",
        lo=1, hi=10 * 365 * 86400)
    default_cold_ttl: int = setting(
        7 * 86400, "Idle seconds before WARM steps down to COLD (per-workspace overridable).",
        lo=1, hi=10 * 365 * 86400)
    max_failures: int = setting(
        8, "Consecutive failures after which a workspace stays in ERROR until an admin acts.",
        lo=1, hi=1000)
    backoff_base: float = setting(1.0, "First retry delay in seconds (doubles).", lo=0.01,
                                  hi=3600)
    backoff_max: float = setting(300.0, "Longest retry delay in seconds.", lo=0.01, hi=86400)
    stuck_timeout: float = setting(
        900.0, "Seconds an operation may run without progress before it is failed and retried.",
        lo=1, hi=86400)
    leader_check_interval: float = setting(
        2.0, "Seconds between liveness checks of the leader lock's connection (and between "
        "campaigns of a standby).", lo=0.1, hi=60)
    event_log: str = setting(
        "", "Append a JSON line per reconcile action (begin/end/failed) to this file. Empty: off.")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The proxy in front of the workspaces."""

    activity_flush_interval: float = setting(
        5.0, "Seconds between batched writes of last_access_at. TTLs are minutes to days, so "
        "a few seconds of lag cost nothing, and one UPDATE per interval keeps database load "
        "independent of the request rate.", lo=0.1, hi=3600)
    activity: str = setting(
        "input", "What keeps a workspace from stepping down. input: what a person does "
        "(requests a browser makes, keys and clicks the workbench reports, edits and "
        "terminal traffic in code-server's WebSockets); the keep-alives, acks and small "
        "background messages an open but untouched IDE tab exchanges do not count, so a "
        "forgotten tab steps down like a closed one. A WebSocket that does not speak "
        "code-server's protocol (a custom image) counts all its traffic. traffic: every "
        "message of every relayed WebSocket counts (an open tab keeps its workspace up).",
        choices=("input", "traffic"))
    websocket_keeps_active: bool = setting(
        False, "Count an open but silent relayed WebSocket as activity at every flush, "
        "whatever gateway.activity says (an open tab then keeps its workspace up). Off: "
        "only messages count, as gateway.activity sorts them.")
    static_dir: str = setting("", "Directory of the pages' assets. Empty: the bundled ones.")
    route_ttl: float = setting(
        10.0, "Seconds a cached route to a running workspace is trusted without a hint before "
        "the database is read again (bounds the cost of a lost hint).", lo=0.1, hi=3600)
    upstream_connect_timeout: float = setting(
        5.0, "Seconds to connect to a workspace before answering 502.", lo=0.1, hi=300)
    upstream_idle_timeout: float = setting(
        4.0, "Seconds an idle keep-alive connection to a workspace is kept. Below code-server's "
        "5 s so the gateway never reuses a connection the workspace is closing.", lo=0.1,
        hi=3600)
    upstream_max_idle: int = setting(
        32, "Idle keep-alive connections kept per workspace.", lo=0, hi=10000)
    stale_route_max: float = setting(
        300.0, "Seconds the gateway keeps proxying a running workspace from its last known "
        "route while the database cannot be read (0: never serve a route it could not "
        "re-read).", lo=0, hi=86400)
    wake_retry_after: int = setting(
        5, "Retry-After seconds sent with 503 to non-HTML requests for a waking workspace.",
        lo=1, hi=3600)
    events_poll_interval: float = setting(
        1.0, "Seconds between database reads for a workspace with open loading-page event "
        "streams (one read for all its streams), besides hints (progress is not hinted; a "
        "hint may be lost).", lo=0.1, hi=60)
    events_per_workspace: int = setting(
        1000, "Open loading-page event streams allowed per workspace; more get 429 with "
        "Retry-After (the page then polls its status).", lo=1, hi=1_000_000)
    events_per_client: int = setting(
        20, "Open event streams allowed per client address (the peer, or the X-Forwarded-For "
        "client when the peer is one of gateway.trusted_proxies); more get 429.", lo=1,
        hi=1_000_000)
    workspace_host: str = setting(
        "", "Serve each workspace at an origin of its own: a host name with {id}, e.g. "
        "{id}.ws.example.com (a wildcard DNS name and certificate), with the scheme of "
        "server.public_url (required). Empty: path mode, every workspace under /w/{id}/ on "
        "one origin, where a page one workspace serves can reach the others through the "
        "browser (single user, development).", check=_workspace_host)
    trusted_proxies: list[str] = setting(
        [], "Peers (IP networks, e.g. 10.0.0.0/8) whose X-Forwarded-For/-Host/-Proto/-Prefix, "
        "Forwarded and X-Real-IP are passed on to workspaces. From any other peer the "
        "gateway sets X-Forwarded-* from what it saw and removes Forwarded and X-Real-IP.",
        check=_ip_networks)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Connection admission: limits per client address and in total, and how long a
    connection may stay silent. The client address of a connection is its peer: behind a
    proxy, the connection limits apply per proxy (WebSocket limits use X-Forwarded-For from
    gateway.trusted_proxies)."""

    connections_per_client: int = setting(
        256, "Concurrent connections per peer address; more are closed at once.", lo=1,
        hi=1_000_000)
    max_connections: int = setting(
        0, "Concurrent client connections in total; more are closed at once. 0: half the "
        "descriptor soft limit (raised to the hard limit at start), the rest left for "
        "upstream sockets, the database and Docker.", lo=0, hi=10_000_000)
    websockets_per_workspace: int = setting(
        200, "WebSockets relayed to one workspace at once; more get 429.", lo=1, hi=1_000_000)
    websockets_per_client: int = setting(
        100, "WebSockets relayed for one client address at once; more get 429.", lo=1,
        hi=1_000_000)
    header_timeout: float = setting(
        10.0, "Seconds a new connection gets to send its first complete request head before "
        "it is closed (0: no limit).", lo=0, hi=3600)
    idle_timeout: float = setting(
        60.0, "Seconds a connection may send nothing (before its first request or between "
        "requests) before it is closed.", lo=1, hi=86400)


def _issuer(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or (
            parts.fragment):
        return f"expected an http(s) URL without query or fragment, got {value!r}"
    if parts.scheme == "http" and not is_loopback_name(parts.hostname):
        return f"must be https (http only on loopback), got {value!r}"
    return None


def is_loopback_name(host: str) -> bool:
    """localhost, *.localhost, or a loopback address."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _scopes(value: list[str]) -> str | None:
    if "openid" not in value:
        return "must include openid"
    bad = [s for s in value if not s or any(c.isspace() or c == '"' for c in s)]
    return f"not a scope: {bad[0]!r}" if bad else None


def _domains(value: list[str]) -> str | None:
    bad = [d for d in value if not d or "@" in d or d != d.strip().lower()]
    return f"expected lower-case domain names without @, got {bad[0]!r}" if bad else None


@dataclass(frozen=True, slots=True)
class OidcConfig:
    """Sign-in with OpenID Connect at the gateway (authorization-code flow with PKCE): a
    browser without a workspace credential is sent to the identity provider and back, and
    opens the workspaces it owns. Empty issuer: off, access links only. Register the
    redirect URL <server.public_url>/_codehub/auth/callback with the provider."""

    issuer: str = setting(
        "", "The provider's issuer URL (its discovery document is <issuer>/.well-known/"
        "openid-configuration); needs server.public_url. Empty: no sign-in.", check=_issuer)
    client_id: str = setting("", "The client id CodeHub is registered with.")
    client_secret: str = setting("", "The client's secret (client_secret_basic).",
                                 secret=True)
    scopes: list[str] = setting(["openid", "email", "profile"],
                                "Scopes asked for (openid is required).", check=_scopes)
    user_claim: str = setting(
        "email", "The ID-token claim that names the person: compared with a workspace's "
        "owner. email and its domain count only when email_verified is true.",
        check=lambda v: None if v else "must not be empty")
    groups_claim: str = setting("groups", "The ID-token claim listing the person's groups.")
    allowed_groups: list[str] = setting(
        [], "Only people in one of these groups may sign in. Empty: any group.")
    allowed_domains: list[str] = setting(
        [], "Only people whose verified email is in one of these domains may sign in. "
        "Empty: any domain.", check=_domains)
    admin_groups: list[str] = setting(
        [], "People in one of these groups are admins: they open every workspace.")
    admins: list[str] = setting(
        [], "People (values of user_claim) who are admins: they open every workspace.")
    session_ttl: int = setting(8 * 3600, "Seconds a sign-in session lasts.", lo=60,
                               hi=30 * 86400)
    metadata_ttl: float = setting(
        3600.0, "Seconds the discovery document and key set are cached.", lo=1, hi=86400)
    jwks_refetch_interval: float = setting(
        30.0, "Least seconds between two key-set fetches caused by an unknown key id (a "
        "provider's key rotation costs one fetch; forged key ids cannot make more).",
        lo=0, hi=3600)
    clock_skew: int = setting(
        60, "Seconds of clock difference tolerated when checking exp and iat.", lo=0, hi=600)
    http_timeout: float = setting(10.0, "Seconds for each request to the provider.",
                                  lo=0.1, hi=300)
    allow_path_mode: bool = setting(
        False, "Allow sign-in without gateway.workspace_host. In path mode every workspace "
        "shares CodeHub's own origin, so a page one person's workspace serves acts with the "
        "session of whoever visits it (opens their workspaces, signs them in as someone "
        "else): only for deployments whose users all trust each other.")
    self_service_create: bool = setting(
        False, "Signed-in people may create workspaces of their own on the self-service page "
        "(at /), up to max_workspaces_per_owner; admins are not limited.")
    self_service_delete: bool = setting(
        False, "Signed-in people may delete their own workspaces on the self-service page.")
    max_workspaces_per_owner: int = setting(
        3, "Most workspaces (not being deleted) a person may own through self-service "
        "creation. Admins and the admin API are not limited.", lo=1, hi=10000)

    @property
    def enabled(self) -> bool:
        return bool(self.issuer)


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Credentials. Secrets are best given through the environment."""

    admin_tokens: list[str] = setting(
        [], "Bearer tokens accepted by the admin API. Empty: API only on a loopback listener.",
        secret=True)
    signing_keys: list[str] = setting(
        [], "HMAC keys for access links and cookies; the first signs, all verify. Empty: a "
        "key is generated and kept in data_dir/signing.key.", secret=True)
    link_ttl: int = setting(300, "Default seconds an access link stays valid.", lo=1,
                            hi=30 * 86400)
    cookie_ttl: int = setting(12 * 3600, "Seconds a workspace cookie stays valid.", lo=60,
                              hi=365 * 86400)
    oidc: OidcConfig = field(default_factory=OidcConfig, metadata={
        "doc": "Sign-in with OpenID Connect: the [auth.oidc] table."})


@dataclass(frozen=True, slots=True)
class Config:
    """All of CodeHub's settings."""

    data_dir: str = setting("./data", "Where embedded PostgreSQL, local archives and keys live.")
    log_level: str = setting("INFO", "Logging level.",
                             choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = setting("text", "Log lines as text, or as one JSON object per line "
                              "(time, level, logger, message, request_id, workspace_id, "
                              "person).", choices=("text", "json"))
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    s3: S3Config = field(default_factory=S3Config)
    docker: DockerConfig = field(default_factory=DockerConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    reconciler: ReconcilerConfig = field(default_factory=ReconcilerConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()


def _sections(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every table by its dotted name (`auth`, `auth.oidc`), parents before children."""
    hints = typing.get_type_hints(cls)
    found: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found[prefix + f.name] = hints[f.name]
            found.update(_sections(hints[f.name], f"{prefix}{f.name}."))
    return found


def _coerce(key: str, kind: Any, value: Any, from_env: bool) -> Any:
    """Turn a TOML value (or an environment string) into `kind`, or raise naming `key`."""
    if typing.get_origin(kind) is list:
        return _coerce_list(key, value, from_env)
    if from_env:
        value = _parse_env_scalar(key, kind, value)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported setting type {kind!r}")  # pragma: no cover


def _coerce_list(key: str, value: Any, from_env: bool) -> list[str]:
    if from_env and isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return list(value)


def _parse_env_scalar(key: str, kind: Any, raw: str) -> Any:
    if kind is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {raw!r}")
    if kind is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
    if kind is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
    return raw


def _check(key: str, f: dataclasses.Field[Any], value: Any) -> None:
    lo, hi, choices = f.metadata.get("lo"), f.metadata.get("hi"), f.metadata.get("choices")
    if lo is not None and value < lo:
        raise ConfigError(f"{key}: must be >= {lo:g}, got {value!r}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: must be <= {hi:g}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    check = f.metadata.get("check")
    if check is not None and (problem := check(value)) is not None:
        raise ConfigError(f"{key}: {problem}")


def _build(cls: type, prefix: str, table: Mapping[str, Any],
           env: Mapping[str, str], env_prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in table:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown key")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            sub = table.get(f.name, {})
            if not isinstance(sub, dict):
                raise ConfigError(f"{key}: expected a [{f.name}] table, got {sub!r}")
            kwargs[f.name] = _build(kind, f"{key}.", sub, env, f"{env_prefix}{f.name.upper()}__")
            continue
        env_name = f"{env_prefix}{f.name.upper()}"
        if env_name in env:
            value = _coerce(f"{key} (from {env_name})", kind, env[env_name], from_env=True)
        elif f.name in table:
            value = _coerce(key, kind, table[f.name], from_env=False)
        else:
            continue
        _check(key, f, value)
        kwargs[f.name] = value
    return cls(**kwargs)


def _unknown_env(env: Mapping[str, str]) -> None:
    """Refuse CODEHUB_* variables that name no setting (a typo would otherwise be ignored)."""
    known = {f"{ENV_PREFIX}{f.name.upper()}" for f in dataclasses.fields(Config)}
    for sname, scls in _sections().items():
        known.update(f"{ENV_PREFIX}{sname.upper().replace('.', '__')}__{f.name.upper()}"
                     for f in dataclasses.fields(scls))
    # Not settings: read by `codehub workspace ...` (client.py) and `--config`.
    ignored = {"CODEHUB_FAILPOINT", "CODEHUB_CONFIG", "CODEHUB_API_URL", "CODEHUB_ADMIN_TOKEN"}
    for name in env:
        if (name.startswith(ENV_PREFIX) and name not in known and name not in ignored
                and not name.startswith("CODEHUB_TEST_")):
            raise ConfigError(f"{name}: unknown setting in the environment")


def load(path: str | os.PathLike[str] | None = None,
         env: Mapping[str, str] | None = None) -> Config:
    """Read the TOML file (if any), apply environment overrides, validate everything."""
    env = os.environ if env is None else env
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    _unknown_env(env)
    cfg: Config = _build(Config, "", table, env, ENV_PREFIX)
    if cfg.database.pool_min > cfg.database.pool_max:
        raise ConfigError("database.pool_min: must be <= database.pool_max")
    if cfg.gateway.workspace_host and not cfg.server.public_url.startswith(
            ("http://", "https://")):
        raise ConfigError("gateway.workspace_host: needs server.public_url (http:// or "
                          "https://), whose scheme the workspace origins use")
    if cfg.reconciler.backoff_base > cfg.reconciler.backoff_max:
        raise ConfigError("reconciler.backoff_base: must be <= reconciler.backoff_max")
    oidc = cfg.auth.oidc
    if oidc.enabled:
        for key in ("client_id", "client_secret"):
            if not getattr(oidc, key):
                raise ConfigError(f"auth.oidc.{key}: required when auth.oidc.issuer is set")
        if not cfg.server.public_url.startswith(("http://", "https://")):
            raise ConfigError("auth.oidc.issuer: needs server.public_url (http:// or "
                              "https://): the redirect URL registered at the provider is "
                              "built from it")
        if not cfg.gateway.workspace_host and not oidc.allow_path_mode:
            raise ConfigError("auth.oidc.issuer: needs gateway.workspace_host (an origin per "
                              "workspace): in path mode a workspace's page can act with its "
                              "visitors' sessions; set auth.oidc.allow_path_mode = true only "
                              "if every user trusts every other")
    return cfg


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def example_toml() -> str:
    """The documented example file: every key, its default, what it does."""
    out = ["# CodeHub configuration. Every key is shown with its default.",
           "# Environment overrides: CODEHUB_<SECTION>__<KEY> (e.g. CODEHUB_SERVER__PORT=9000),",
           "# CODEHUB_<KEY> for top-level keys. Lists in the environment are comma-separated.",
           "# A section left out (or an empty url) selects the embedded default for it.", ""]

    def emit(cls: type, obj: Any) -> None:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue
            doc = f.metadata["doc"]
            extra = []
            if f.metadata.get("choices"):
                extra.append("one of " + ", ".join(f.metadata["choices"]))
            if f.metadata.get("lo") is not None or f.metadata.get("hi") is not None:
                extra.append(f"range {f.metadata['lo']:g}..{f.metadata['hi']:g}")
            out.append(f"# {doc}" + (f" ({'; '.join(extra)})" if extra else ""))
            out.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")

    defaults = Config()
    emit(Config, defaults)
    for sname, scls in _sections().items():
        out.append("")
        out.append(f"[{sname}]")
        out.append("# " + " ".join((scls.__doc__ or "").split()))
        obj: Any = defaults
        for part in sname.split("."):
            obj = getattr(obj, part)
        emit(scls, obj)
    return "\n".join(out) + "\n"


def describe_secret_free(cfg: Config) -> dict[str, Any]:
    """The settings with secrets masked, for logging at start-up."""
    def walk(cls: type, obj: Any) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                res[f.name] = walk(type(v), v)
            elif f.metadata.get("secret") and v:
                res[f.name] = "***"
            else:
                res[f.name] = v
        return res
    return walk(Config, cfg)

