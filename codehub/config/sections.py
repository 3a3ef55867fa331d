"""The sections of CodeHub's settings, one frozen dataclass each, and `Config`, their root.

Guarantees:
- Every setting is one dataclass field declared with `setting()`: a default, a `doc` and
  its valid range or check; `config.example.toml` is generated from these fields, so it
  cannot drift.
- A section's docstring is the comment of its table in the example file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .fields import (
    check_capabilities,
    check_domains,
    check_ip_networks,
    check_ipv4_networks,
    check_issuer,
    check_scopes,
    check_workspace_host,
    setting,
    uid_gid,
)


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
        "ranges: an internal DNS resolver, a package mirror or proxy.", check=check_ipv4_networks)
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
        "none).", check=check_capabilities)
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
        "restored file.", check=lambda v: None if uid_gid(v) else "expected uid:gid")


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
    busy_poll_us: int = setting(
        100, "Microseconds the event loop keeps polling after it forwarded a request or a "
        "WebSocket chunk, instead of sleeping at once: the answer, or the browser's next "
        "request, then finds the gateway awake (on a VM, waking a halted CPU costs tens of "
        "microseconds per hop). In any second it polls no longer than the loop worked (plus "
        "5 ms), so a trickle of traffic cannot make it poll a whole CPU; idle rounds yield "
        "to other ready tasks first; nothing at rest. 0: off.", lo=0, hi=10000)
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
        "browser (single user, development).", check=check_workspace_host)
    trusted_proxies: list[str] = setting(
        [], "Peers (IP networks, e.g. 10.0.0.0/8) whose X-Forwarded-For/-Host/-Proto/-Prefix, "
        "Forwarded and X-Real-IP are passed on to workspaces. From any other peer the "
        "gateway sets X-Forwarded-* from what it saw and removes Forwarded and X-Real-IP.",
        check=check_ip_networks)


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



@dataclass(frozen=True, slots=True)
class OidcConfig:
    """Sign-in with OpenID Connect at the gateway (authorization-code flow with PKCE): a
    browser without a workspace credential is sent to the identity provider and back, and
    opens the workspaces it owns. Empty issuer: off, access links only. Register the
    redirect URL <server.public_url>/_codehub/auth/callback with the provider."""

    issuer: str = setting(
        "", "The provider's issuer URL (its discovery document is <issuer>/.well-known/"
        "openid-configuration); needs server.public_url. Empty: no sign-in.", check=check_issuer)
    client_id: str = setting("", "The client id CodeHub is registered with.")
    client_secret: str = setting("", "The client's secret (client_secret_basic).",
                                 secret=True)
    scopes: list[str] = setting(["openid", "email", "profile"],
                                "Scopes asked for (openid is required).", check=check_scopes)
    user_claim: str = setting(
        "email", "The ID-token claim that names the person: compared with a workspace's "
        "owner. email and its domain count only when email_verified is true.",
        check=lambda v: None if v else "must not be empty")
    groups_claim: str = setting("groups", "The ID-token claim listing the person's groups.")
    allowed_groups: list[str] = setting(
        [], "Only people in one of these groups may sign in. Empty: any group.")
    allowed_domains: list[str] = setting(
        [], "Only people whose verified email is in one of these domains may sign in. "
        "Empty: any domain.", check=check_domains)
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
