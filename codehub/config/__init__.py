"""Settings: a TOML file plus environment overrides, parsed into frozen dataclasses.

Guarantees:
- Parsing and validation happen here and nowhere else. Every other module receives typed,
  already-valid values.
- Every setting is one dataclass field with a default and a `doc` (sections.py);
  `config.example.toml` is generated from these fields (`codehub config example`,
  example.py), so it cannot drift.
- Any bad input raises `ConfigError` whose message names the key (`section.key`) and what
  is wrong with it: an unknown key, a wrong type, a value out of range (loader.py).
- Environment variables override the file: `CODEHUB_<SECTION>__<KEY>` (for example
  `CODEHUB_SERVER__PORT=9000`, `CODEHUB_DATABASE__URL=postgresql://…`), and `CODEHUB_<KEY>`
  for top-level keys (`CODEHUB_DATA_DIR`); a table inside a section doubles the separator
  again (`CODEHUB_AUTH__OIDC__ISSUER`). Lists in the environment are comma-separated.
- A section left out entirely (or an empty URL) selects the embedded default for it.

The package: fields.py (what a setting is, the error, the checks), sections.py (the
dataclasses), loader.py (`load`), example.py (the example file, the start-up record).
"""

from .example import describe_secret_free, example_toml
from .fields import ENV_PREFIX, ConfigError, home_owner, is_loopback_name, setting
from .loader import load
from .sections import (
    ArchiveConfig,
    AuthConfig,
    Config,
    DatabaseConfig,
    DockerConfig,
    GatewayConfig,
    LimitsConfig,
    OidcConfig,
    ReconcilerConfig,
    RedisConfig,
    S3Config,
    ServerConfig,
)

__all__ = ["ENV_PREFIX", "ArchiveConfig", "AuthConfig", "Config", "ConfigError",
           "DatabaseConfig", "DockerConfig", "GatewayConfig", "LimitsConfig", "OidcConfig",
           "ReconcilerConfig", "RedisConfig", "S3Config", "ServerConfig",
           "describe_secret_free", "example_toml", "home_owner", "is_loopback_name", "load",
           "setting"]
