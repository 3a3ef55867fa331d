"""`codehub workspace ...` against a live API server (real PostgreSQL), as a person runs it.

Guarantees of codehub/client.py pinned here: every action reaches its endpoint and prints
a table, `key: value` lines or (with --json) the API's JSON; lists follow cursors past one
page; the URL and token come from --url / $CODEHUB_API_URL / the config and
$CODEHUB_ADMIN_TOKEN / the config; API errors exit 1 with the error's code on stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from apitools import TOKEN, LiveServer, make_config

from codehub import cli, client
from codehub.config import AuthConfig, Config, ServerConfig
from codehub.model import DesiredState, Operation, Status


@pytest.fixture
def live(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    with LiveServer(database_url) as server:
        monkeypatch.setenv(client.ENV_URL, server.url)
        monkeypatch.setenv(client.ENV_TOKEN, TOKEN)
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["workspace", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fields(out: str) -> dict[str, str]:
    """`key: value` lines as a dict."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return orjson.loads(out)


def test_create_show_set_and_delete_print_the_workspace(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "create", "alice-1", "--owner", "alice", "--warm-ttl", "15m",
                       "--cold-ttl", "2d", "--desired", "WARM")
    shown = fields(out)
    assert code == 0 and shown["id"] == "alice-1" and shown["owner"] == "alice"
    assert shown["warm ttl"] == "15m" and shown["cold ttl"] == "2d"
    assert shown["desired"] == "WARM"
    code, out, _ = run(capsys, "show", "alice-1")
    assert code == 0 and fields(out)["status"] == "NEW"
    code, out, _ = run(capsys, "set", "alice-1", "--desired", "RUNNING", "--warm-ttl",
                       "default")
    assert code == 0 and fields(out)["desired"] == "RUNNING"
    assert fields(out)["warm ttl"] == "30m"
    code, out, _ = run(capsys, "delete", "alice-1")
    assert code == 0 and fields(out)["desired"] == "DELETED"


def test_json_output_is_the_api_json(live: LiveServer,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    made = run_json(capsys, "create", "--owner", "bob", "--image", "ubuntu:24.04")
    assert made["owner"] == "bob" and made["image"] == "ubuntu:24.04"
    shown = run_json(capsys, "show", made["id"])
    assert shown == made


def test_list_prints_a_table_and_follows_cursors_past_one_page(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> None:
        for i in range(130):
            await live.store.create(id=f"w{i:03d}", owner="carol" if i % 2 else "dave",
                                    image_ref="img")
    live.run(seed())
    rows = run_json(capsys, "list")
    assert [r["id"] for r in rows] == [f"w{i:03d}" for i in range(130)]
    assert len(run_json(capsys, "list", "--owner", "carol")) == 65
    assert len(run_json(capsys, "list", "--limit", "7")) == 7
    code, out, _ = run(capsys, "list", "--status", "NEW", "--limit", "2")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["ID", "OWNER", "STATUS"]
    assert lines[1].split()[:3] == ["w000", "dave", "NEW"] and len(lines) == 3


def test_restore_retry_and_link(live: LiveServer,
                                capsys: pytest.CaptureFixture[str]) -> None:
    async def seed() -> None:
        db = live.store
        await db.create(id="cold", owner="o", image_ref="img", desired_state=DesiredState.COLD)
        await db.compare_and_set("cold", expect_status=Status.NEW,
                                 expect_operation=Operation.NONE, status=Status.COLD,
                                 archive_key="cold/home.tar.gz", archive_size=3 << 20,
                                 archive_sha256="ab" * 32)
        await db.create(id="bad", owner="o", image_ref="img")
        await db.compare_and_set("bad", expect_status=Status.NEW,
                                 expect_operation=Operation.NONE, status=Status.ERROR,
                                 error_from_status=Status.NEW, error_message="boom",
                                 error_count=8)
    live.run(seed())
    code, out, _ = run(capsys, "show", "cold")
    assert fields(out)["archive"].startswith("cold/home.tar.gz (3.0 MiB, sha256 abab")
    assert run_json(capsys, "restore", "cold", "--start")["desired_state"] == "RUNNING"
    code, out, _ = run(capsys, "show", "bad")
    assert fields(out)["error"].startswith("boom (x8, at ")
    assert run_json(capsys, "retry", "bad")["status"] == "NEW"
    code, out, err = run(capsys, "link", "cold", "--ttl", "2m")
    assert code == 0 and out.startswith(live.url + "/w/cold/?access=")
    assert "valid until" in err
    assert set(run_json(capsys, "link", "cold")) == {"url", "expires_at"}


def test_api_errors_exit_1_with_status_and_code_on_stderr(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "show", "nobody")
    assert code == 1 and out == "" and "404 not_found" in err
    code, _, err = run(capsys, "restore", "nobody")
    assert code == 1 and "404" in err
    run(capsys, "create", "w", "--owner", "o")
    code, _, err = run(capsys, "restore", "w")
    assert code == 1 and "409 not_cold" in err
    code, _, err = run(capsys, "show", "../etc")
    assert code == 1 and "400" in err


def test_a_wrong_token_exits_1_with_unauthorized(
        live: LiveServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(client.ENV_TOKEN, "wrong")
    code, _, err = run(capsys, "list")
    assert code == 1 and "401 unauthorized" in err


def test_set_with_nothing_to_set_is_a_usage_error(
        live: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "set", "w")
    assert code == 2 and "nothing to set" in err


def test_an_unreachable_api_exits_1(capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client.ENV_TOKEN, raising=False)
    code, _, err = run(capsys, "list", "--url", "http://127.0.0.1:9")
    assert code == 1 and "cannot reach http://127.0.0.1:9" in err


def test_url_and_token_come_from_the_config_when_the_environment_is_silent(
        live: LiveServer, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(client.ENV_URL)
    monkeypatch.delenv(client.ENV_TOKEN)
    port = live.url.rsplit(":", 1)[1]
    conf = tmp_path / "codehub.toml"
    conf.write_text(f'[server]\nhost = "0.0.0.0"\nport = {port}\n'
                    f'[auth]\nadmin_tokens = ["{TOKEN}"]\n')
    code = cli.main(["--config", str(conf), "workspace", "list"])
    _, err = capsys.readouterr()
    assert code == 0, err


def test_target_precedence() -> None:
    cfg = Config(server=ServerConfig(host="::", port=9100),
                 auth=AuthConfig(admin_tokens=["from-config"]))
    assert client.target(cfg, None, {}) == ("http://127.0.0.1:9100", "from-config")
    v6 = Config(server=ServerConfig(host="::1", port=9100))
    assert client.target(v6, None, {}) == ("http://[::1]:9100", None)
    env = {client.ENV_URL: "http://env:1", client.ENV_TOKEN: "from-env"}
    assert client.target(cfg, None, env) == ("http://env:1", "from-env")
    assert client.target(cfg, "http://flag:2", env) == ("http://flag:2", "from-env")
    assert make_config().auth.admin_tokens == [TOKEN]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("7d", 604800)])
def test_durations(text: str, seconds: int) -> None:
    assert client.duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1.5h", "-5", "5w", "m"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        client.duration(text)
