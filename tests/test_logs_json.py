"""`log_format = "json"` on a real `codehub serve`: every line it writes is one JSON object,
and none carries a secret (the admin token, an access link's token, a workspace cookie)."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from test_serve import base_env, codehub, data_dir, free_port, wait_ready  # noqa: F401

TOKEN = "json-logs-admin-" + secrets.token_hex(12)


def api(port: int, method: str, path: str, body: Any = None,
        token: str = TOKEN) -> tuple[int, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1{path}", method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def delete_and_stop(port: int, proc: subprocess.Popen[str], wid: str) -> list[str]:
    """Delete `wid`, wait until it is purged (nothing left behind), SIGTERM the server,
    and return the non-empty lines it wrote."""
    assert api(port, "DELETE", f"/workspaces/{wid}")[0] == 202
    deadline = time.monotonic() + 60
    while api(port, "GET", f"/workspaces/{wid}")[0] != 404:
        assert time.monotonic() < deadline, "the workspace was not purged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    output = proc.stdout.read()  # type: ignore[union-attr]
    return [line for line in output.splitlines() if line.strip()]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kw: Any) -> None:
        return None


def redeem(url: str) -> str:
    """Follow an access link once, without the redirect: the Set-Cookie it answers."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        opener.open(url, timeout=10)
    except urllib.error.HTTPError as err:
        assert err.code == 303, err.code
        return str(err.headers["Set-Cookie"])
    raise AssertionError("the access link was not answered with 303")


def test_every_line_of_a_json_serve_parses_and_none_holds_a_token_link_or_cookie(
        data_dir: Path) -> None:  # noqa: F811
    port, tag = free_port(), "jl" + secrets.token_hex(3)
    env = base_env(CODEHUB_DATA_DIR=str(data_dir), CODEHUB_SERVER__PORT=str(port),
                   CODEHUB_LOG_FORMAT="json", CODEHUB_LOG_LEVEL="DEBUG",
                   CODEHUB_AUTH__ADMIN_TOKENS=TOKEN,
                   CODEHUB_DOCKER__CONTAINER_PREFIX=f"{tag}-ws-",
                   CODEHUB_DOCKER__VOLUME_PREFIX=f"{tag}-home-",
                   CODEHUB_DOCKER__NETWORK=f"{tag}-net")
    proc = codehub("serve", env=env)
    secrets_seen: list[str] = [TOKEN]
    try:
        wait_ready(port, proc)
        status, ws = api(port, "POST", "/workspaces",
                         {"id": "jl-1", "owner": "ann", "desired_state": "WARM"})
        assert status == 201, ws
        status, link = api(port, "POST", "/workspaces/jl-1/access-links")
        assert status == 201, link
        secrets_seen.append(link["url"].split("access=", 1)[1])
        cookie = redeem(link["url"].replace("localhost", "127.0.0.1"))
        secrets_seen.append(cookie.split(";", 1)[0].split("=", 1)[1])
        assert api(port, "GET", "/workspaces/jl-1", token="wrong-token")[0] == 401
        assert api(port, "GET", "/workspaces/nope-1")[0] == 404
        lines = delete_and_stop(port, proc, "jl-1")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert len(lines) > 10, lines
    parsed = []
    for line in lines:
        try:
            parsed.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        for secret in secrets_seen:
            assert secret not in line, f"a secret in the log: {line!r}"
    assert all({"time", "level", "logger", "message"} <= set(p) for p in parsed)
    assert any(p.get("request_id") and p.get("workspace_id") == "jl-1" for p in parsed)
    assert any(p["logger"] == "aiohttp.access" for p in parsed)  # DEBUG: the access log too
    assert proc.returncode == 0


async def _sign_in(port: int) -> list[str]:
    """Sign in as alice through the provider's own forms and open her workspace up to the
    access-link exchange; the values of every cookie handed out on the way."""
    import aiohttp
    from harness import oidc

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        hops = await oidc.walk(http, f"http://127.0.0.1:{port}/w/jl-2/", user="alice",
                               password=oidc.USERS["alice"],
                               stop=lambda h: "access=" in h.url)
        assert "access=" in hops[-1].url and hops[-1].status == 303, hops[-1]
        values = [h.url.split("access=", 1)[1] for h in hops if "access=" in h.url]
        for hop in hops:
            values += [c.split(";", 1)[0].split("=", 1)[1] for c in hop.set_cookie
                       if c.split("=", 1)[1].split(";", 1)[0]]
    return values


def test_a_json_serve_with_sign_in_logs_no_session_flow_or_workspace_cookie(
        data_dir: Path) -> None:  # noqa: F811
    import asyncio

    from harness import oidc

    port, tag = free_port(), "jo" + secrets.token_hex(3)
    main = f"http://127.0.0.1:{port}"
    provider = oidc.start_oidc_provider([main + "/_codehub/auth/callback"],
                                        post_logout_redirect_uris=[
                                            main + "/_codehub/auth/signed-out"])
    env = base_env(CODEHUB_DATA_DIR=str(data_dir), CODEHUB_SERVER__PORT=str(port),
                   CODEHUB_SERVER__PUBLIC_URL=main, CODEHUB_LOG_FORMAT="json",
                   CODEHUB_LOG_LEVEL="DEBUG", CODEHUB_AUTH__ADMIN_TOKENS=TOKEN,
                   CODEHUB_AUTH__OIDC__ISSUER=provider.issuer,
                   CODEHUB_AUTH__OIDC__CLIENT_ID=oidc.CLIENT_ID,
                   CODEHUB_AUTH__OIDC__CLIENT_SECRET=oidc.CLIENT_SECRET,
                   CODEHUB_AUTH__OIDC__ALLOW_PATH_MODE="true",
                   CODEHUB_DOCKER__CONTAINER_PREFIX=f"{tag}-ws-",
                   CODEHUB_DOCKER__VOLUME_PREFIX=f"{tag}-home-",
                   CODEHUB_DOCKER__NETWORK=f"{tag}-net")
    proc = codehub("serve", env=env)
    try:
        wait_ready(port, proc)
        status, _ = api(port, "POST", "/workspaces", {
            "id": "jl-2", "owner": "alice@example.test", "desired_state": "WARM"})
        assert status == 201
        handed_out = asyncio.run(_sign_in(port))
        assert len(handed_out) >= 3  # the flow and session cookies, the link, the cookie
        lines = delete_and_stop(port, proc, "jl-2")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        provider.close()
    for line in lines:
        orjson.loads(line)  # every line one JSON object
        for secret in (TOKEN, oidc.CLIENT_SECRET, *handed_out):
            assert secret not in line, f"a secret in the log: {line!r}"
        assert "eyJ" not in line, f"a JWT (session, flow or ID token) in the log: {line!r}"
    assert any("alice@example.test" in line and "sign" in line.lower() for line in lines)
    assert proc.returncode == 0
