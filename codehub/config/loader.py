"""Reading settings: a TOML file plus environment overrides, coerced and checked.

Guarantees:
- Any bad input raises `ConfigError` whose message names the key (`section.key`, and the
  variable when it came from the environment) and what is wrong with it: an unknown key
  or variable, a wrong type, a value out of range, a setting that needs another.
- The environment overrides the file: `CODEHUB_<SECTION>__<KEY>`, `CODEHUB_<KEY>` for
  top-level keys, the separator doubled again for a table inside a section; lists in the
  environment are comma-separated.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from typing import Any

from .fields import ENV_PREFIX, ConfigError
from .sections import Config


def tables(cls: type = Config, prefix: str = "") -> dict[str, type]:
    """Every table by its dotted name (`auth`, `auth.oidc`), parents before children."""
    hints = typing.get_type_hints(cls)
    found: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found[prefix + f.name] = hints[f.name]
            found.update(tables(hints[f.name], f"{prefix}{f.name}."))
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
    for sname, scls in tables().items():
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
