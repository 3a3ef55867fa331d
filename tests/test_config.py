"""Configuration: every bad input is one line naming its key; the example cannot drift."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from codehub import config

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "codehub.toml"
    p.write_text(text)
    return p


def test_defaults_load_without_file_or_environment() -> None:
    cfg = config.load(None, env={})
    assert cfg.server.port == 8000
    assert cfg.database.url == ""  # embedded default
    assert cfg.reconciler.default_warm_ttl == 1800
    assert cfg.reconciler.default_cold_ttl == 7 * 86400


def test_file_values_are_read(tmp_path: Path) -> None:
    p = write(tmp_path, '[server]\nport = 9001\n[auth]\nadmin_tokens = ["a", "b"]\n')
    cfg = config.load(p, env={})
    assert cfg.server.port == 9001
    assert cfg.auth.admin_tokens == ["a", "b"]


def test_environment_overrides_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[server]\nport = 9001\n")
    env = {"CODEHUB_SERVER__PORT": "9002", "CODEHUB_DATA_DIR": "/srv/x",
           "CODEHUB_AUTH__SIGNING_KEYS": "k1, k2", "CODEHUB_RECONCILER__ENABLED": "false",
           "CODEHUB_SERVER__SHUTDOWN_TIMEOUT": "2.5"}
    cfg = config.load(p, env=env)
    assert cfg.server.port == 9002
    assert cfg.data_dir == "/srv/x"
    assert cfg.auth.signing_keys == ["k1", "k2"]
    assert cfg.reconciler.enabled is False
    assert cfg.server.shutdown_timeout == 2.5


@pytest.mark.parametrize(("text", "env", "message"), [
    ('[server]\nport = "eighty"\n', {}, "server.port: expected an integer, got 'eighty'"),
    ("[server]\nport = 70000\n", {}, "server.port: must be <= 65535, got 70000"),
    ("[server]\nprot = 80\n", {}, "server.prot: unknown key"),
    ("[serverz]\nport = 80\n", {}, "serverz: unknown key"),
    ("log_level = 'LOUD'\n", {}, "log_level: must be one of DEBUG, INFO, WARNING, ERROR"),
    ("[reconciler]\nenabled = 1\n", {}, "reconciler.enabled: expected true or false"),
    ("[auth]\nadmin_tokens = 'x'\n", {}, "auth.admin_tokens: expected a list of strings"),
    ("server = 3\n", {}, "server: expected a [server] table"),
    ("[database]\npool_min = 5\npool_max = 2\n", {}, "database.pool_min: must be <="),
    ("[gateway]\nevents_per_client = 0\n", {}, "gateway.events_per_client: must be >= 1"),
    ("[gateway]\nactivity = 'keys'\n", {},
     "gateway.activity: must be one of input, traffic, got 'keys'"),
    ("", {"CODEHUB_GATEWAY__ACTIVITY": "all"},
     "gateway.activity: must be one of input, traffic, got 'all'"),
    ("[gateway]\nevents_per_workspace = 'many'\n", {},
     "gateway.events_per_workspace: expected an integer"),
    ("", {"CODEHUB_SERVER__PORT": "x"},
     "server.port (from CODEHUB_SERVER__PORT): expected an integer, got 'x'"),
    ("", {"CODEHUB_SERVER__PROT": "1"}, "CODEHUB_SERVER__PROT: unknown setting"),
    ("[server\n", {}, "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str],
                                  message: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as err:
        config.load(p, env=env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml", env={})


def test_example_file_is_generated_from_the_settings() -> None:
    committed = (ROOT / "config.example.toml").read_text()
    assert committed == config.example_toml(), "run: codehub config example > config.example.toml"


def test_example_file_loads_to_the_defaults() -> None:
    assert config.load(ROOT / "config.example.toml", env={}) == config.load(None, env={})


def test_every_setting_is_documented() -> None:
    import dataclasses
    for section in dataclasses.fields(config.Config):
        obj = getattr(config.Config(), section.name)
        cls = type(obj) if dataclasses.is_dataclass(obj) else None
        for f in dataclasses.fields(cls) if cls else [section]:
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"


def test_secrets_are_masked_when_shown() -> None:
    cfg = config.load(None, env={"CODEHUB_DATABASE__URL": "postgresql://u:pw-7f3a@h/db",
                                 "CODEHUB_AUTH__ADMIN_TOKENS": "tok"})
    shown = config.describe_secret_free(cfg)
    assert "pw-7f3a" not in repr(shown)
    assert shown["auth"]["admin_tokens"] == "***"


@pytest.mark.parametrize(("text", "needle"), [
    ('[server]\nport = "x"\n', "server.port"),
    ("[nope]\n", "nope: unknown key"),
])
def test_cli_exits_2_with_one_line_naming_the_key(tmp_path: Path, text: str,
                                                  needle: str) -> None:
    p = write(tmp_path, text)
    for command in (["serve"], ["migrate"], ["config", "check"]):
        proc = subprocess.run([sys.executable, "-m", "codehub.cli", "--config", str(p),
                               *command], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr


@pytest.mark.parametrize("env, key", [
    ({"CODEHUB_GATEWAY__WORKSPACE_HOST": "ws-{id}.example.com"}, "gateway.workspace_host"),
    ({"CODEHUB_GATEWAY__WORKSPACE_HOST": "{id}.Example.com"}, "gateway.workspace_host"),
    ({"CODEHUB_GATEWAY__WORKSPACE_HOST": "{id}.ws.example.com:99999",
      "CODEHUB_SERVER__PUBLIC_URL": "https://example.com"}, "gateway.workspace_host"),
    ({"CODEHUB_GATEWAY__WORKSPACE_HOST": "{id}.ws.example.com"}, "gateway.workspace_host"),
    ({"CODEHUB_GATEWAY__TRUSTED_PROXIES": "10.0.0.0/8,not-a-net"}, "gateway.trusted_proxies"),
])
def test_workspace_origins_and_trusted_proxies_are_checked(env: dict[str, str], key: str,
                                                           ) -> None:
    # The fourth case is well formed but has no server.public_url to take the scheme from.
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.load(env=env)
    good = {"CODEHUB_GATEWAY__WORKSPACE_HOST": "{id}.ws.localhost:8000",
            "CODEHUB_SERVER__PUBLIC_URL": "http://localhost:8000",
            "CODEHUB_GATEWAY__TRUSTED_PROXIES": "10.0.0.0/8,::1/128"}
    assert config.load(env=good).gateway.workspace_host == "{id}.ws.localhost:8000"


OIDC = {"CODEHUB_SERVER__PUBLIC_URL": "https://code.example.com",
        "CODEHUB_GATEWAY__WORKSPACE_HOST": "{id}.ws.example.com",
        "CODEHUB_AUTH__OIDC__ISSUER": "https://id.example.com/realms/x",
        "CODEHUB_AUTH__OIDC__CLIENT_ID": "codehub",
        "CODEHUB_AUTH__OIDC__CLIENT_SECRET": "s3cret-9d1e"}


def test_oidc_table_is_read_from_file_and_environment(tmp_path: Path) -> None:
    p = write(tmp_path, '[server]\npublic_url = "http://127.0.0.1:8000"\n[auth.oidc]\n'
                        'issuer = "http://127.0.0.1:5556"\nclient_id = "a"\n'
                        'client_secret = "b"\nadmin_groups = ["admins"]\n'
                        'allow_path_mode = true\n')
    cfg = config.load(p, env={"CODEHUB_AUTH__OIDC__SCOPES": "openid,email,groups"})
    assert cfg.auth.oidc.enabled and cfg.auth.oidc.issuer == "http://127.0.0.1:5556"
    assert cfg.auth.oidc.admin_groups == ["admins"]
    assert cfg.auth.oidc.scopes == ["openid", "email", "groups"]
    assert not config.load(None, env={}).auth.oidc.enabled


@pytest.mark.parametrize(("env", "message"), [
    ({**OIDC, "CODEHUB_AUTH__OIDC__ISSUER": "http://id.example.com"},
     "auth.oidc.issuer: must be https"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__ISSUER": "https://id.example.com/?x=1"},
     "auth.oidc.issuer: expected an http(s) URL"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__CLIENT_ID": ""},
     "auth.oidc.client_id: required when auth.oidc.issuer is set"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__CLIENT_SECRET": ""},
     "auth.oidc.client_secret: required when auth.oidc.issuer is set"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__SCOPES": "email"}, "auth.oidc.scopes"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__ALLOWED_DOMAINS": "@example.com"},
     "auth.oidc.allowed_domains"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__SESSION_TTL": "5"}, "auth.oidc.session_ttl: must be >= 60"),
    ({**OIDC, "CODEHUB_AUTH__OIDC__ISSUR": "x"}, "CODEHUB_AUTH__OIDC__ISSUR: unknown setting"),
    ({**OIDC, "CODEHUB_SERVER__PUBLIC_URL": "", "CODEHUB_GATEWAY__WORKSPACE_HOST": "",
      "CODEHUB_AUTH__OIDC__ALLOW_PATH_MODE": "true"},
     "auth.oidc.issuer: needs server.public_url"),
])
def test_bad_oidc_setting_names_its_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load(None, env=env)
    assert message in str(err.value)


def test_sign_in_without_an_origin_per_workspace_is_refused_unless_allowed() -> None:
    path_mode = {k: v for k, v in OIDC.items() if k != "CODEHUB_GATEWAY__WORKSPACE_HOST"}
    with pytest.raises(config.ConfigError, match=r"auth\.oidc\.issuer: needs "
                       r"gateway\.workspace_host"):
        config.load(None, env=path_mode)
    allowed = config.load(None, env={**path_mode, "CODEHUB_AUTH__OIDC__ALLOW_PATH_MODE": "1"})
    assert allowed.auth.oidc.allow_path_mode and not allowed.gateway.workspace_host


def test_oidc_unknown_key_in_file_names_it(tmp_path: Path) -> None:
    p = write(tmp_path, '[auth.oidc]\nclient = "x"\n')
    with pytest.raises(config.ConfigError, match=r"auth\.oidc\.client: unknown key"):
        config.load(p, env={})


def test_oidc_client_secret_is_masked_when_shown() -> None:
    shown = config.describe_secret_free(config.load(None, env=OIDC))
    assert "s3cret-9d1e" not in repr(shown)
    assert shown["auth"]["oidc"]["client_secret"] == "***"
    assert shown["auth"]["oidc"]["client_id"] == "codehub"
