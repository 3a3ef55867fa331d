"""One workspace's page against another, in a real browser (issue #12, acceptance 1).

Two real echo workspaces, A (`wsa`) and B (`wsb`), each opened through an access link the
admin API minted, in ONE chromium context (so the browser holds both cookies, as it
would for a user of both). B's user wrote `attack.html` and `sw.js` into B's home; B's
echo server serves them (`/_echo/home/...`), so the page runs with B's origin, exactly as
any HTML a workspace serves (code-server's /proxy/<port>/, a dev server) would. The page
tries, on its own, with the browser's credentials:

1. `read`: `fetch(A's "/", {credentials: "include"})` and read the body;
2. `websocket`: open A's WebSocket (`/_echo/ws`) and exchange a message;
3. `post`: `fetch(A, {method: "POST", mode: "no-cors", credentials: "include"})`;
4. `sw_root`: register a service worker with scope "/" from `sw.js`, which B's server
   sends with `Service-Worker-Allowed: /` (control `sw_own`: the same script with its
   default scope, which must work, so that a failure of 4 is the header's absence);
5. `own_echo`: fetch B's own echo: which cookies reach B's workspace;
6. `toss`: set cookies for A from B's script (`tossed=...` and `codehub_ws=tossed`, for
   the parent domain `ws.localhost` in host mode, Path=/w/wsa/ in path mode); then the
   user opens A again.

Whether a request reached A is read from A's echo server's request log
(`/_echo/requests`), not from what the page saw; the gateway's answers from the
responses chromium got; which cookies the browser holds and sent to B's origin from
the browser itself (Playwright's cookie jar and the requests' Cookie headers).

Results (each row asserted by the test of its mode):

===========================  ================================  ==============================
attempt by B's page          host mode (origin per workspace)  path mode (one origin)
===========================  ================================  ==============================
1 read A's "/" w/ cookies    FAILS: CORS (TypeError); the GET  SUCCEEDS: 200 and A's body
                             reaches A (a safe method; A's     (same origin; the browser
                             cookie is sent: same-site) but    sends A's cookie, Path is no
                             its answer is never readable      boundary)
2 A's WebSocket + message    FAILS: 403 (Origin is B's), A     SUCCEEDS: echo of the message
                             never sees the upgrade            (Origin is the shared origin)
3 POST to A (no-cors)        FAILS: 403 (Origin/Sec-Fetch-     SUCCEEDS: reaches A, 200
                             Site same-site), never reaches A  (same-origin passes the check)
                             (the page gets an opaque answer)
4 service worker, scope "/"  FAILS: SecurityError (the         FAILS: the same
                             gateway strips Service-Worker-
                             Allowed); own scope works
5 cookies at B's workspace   none of CodeHub's (the gateway    the same
                             strips its cookie; others pass)
6 cookies set by B for A     `tossed` reaches A's workspace    the same, and B's own Path=/
                             (siblings are same-site: Domain=  cookies too; `codehub_ws` is
                             ws.localhost is allowed); the     refused by the browser (an
                             tossed `codehub_ws` is stripped   HttpOnly one of that name and
                             and A's session still works       path exists); A's session works
A's cookie sent to B's       never (host-only cookie of A's    never for B's own paths (Path
origin                       origin)                           =/w/wsa/), but B's page makes
                                                               the browser send it to A (1-3)
===========================  ================================  ==============================

So in path mode a page one workspace serves can read and drive another (the README's and
the start-up log's warning, true by test); in host mode nothing of A is reachable. What
host mode leaves (row 6) is the browser's rule for sibling hosts: B can plant cookies
that A's workspace receives (not CodeHub's: on HTTPS `__Host-codehub_ws` cannot be set
with a Domain at all); only a workspace domain on the Public Suffix List, or one
registrable domain per workspace, stops that.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import playwright.async_api as playwright_api
import pytest
from gateway_support import Stack, Upstream, client, open_stack, start_workspace_container
from harness import services
from harness.services import free_port
from isolation_support import exec_in
from test_gateway_browser import CHROMIUM, CHROMIUM_ARGS, mint

from codehub.config import ServerConfig
from codehub.gateway import auth

A, B = "wsa", "wsb"

# B's page: reads what to attack from its fragment, tries each attempt, and leaves the
# outcome in window.__results (each {ok, value} or {ok: false, error}).
ATTACK_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>B's page</title></head><body>
<p id="state">running</p>
<script>
(async () => {
  const cfg = JSON.parse(decodeURIComponent(location.hash.slice(1)));
  const results = window.__partial = {};
  const attempt = async (name, fn) => {
    try { results[name] = {ok: true, value: await fn()}; }
    catch (e) { results[name] = {ok: false, error: e.name + ": " + e.message}; }
  };
  await attempt("read", async () => {
    const r = await fetch(cfg.a_read, {credentials: "include"});
    return {status: r.status, body: await r.text()};
  });
  await attempt("websocket", () => new Promise((resolve, reject) => {
    const ws = new WebSocket(cfg.a_ws);
    const timer = setTimeout(() => reject(new Error("no answer in 10 s")), 10000);
    ws.onopen = () => ws.send("hello from B");
    ws.onmessage = (ev) => { clearTimeout(timer); resolve(ev.data); ws.close(); };
    ws.onerror = () => { clearTimeout(timer); reject(new Error("WebSocket error")); };
    ws.onclose = (ev) => { clearTimeout(timer); reject(new Error("closed " + ev.code)); };
  }));
  await attempt("post", async () => {
    const r = await fetch(cfg.a_post, {method: "POST", mode: "no-cors",
                                       credentials: "include", body: "from B"});
    return {type: r.type, status: r.status};
  });
  await attempt("sw_root", async () => {
    const reg = await navigator.serviceWorker.register(cfg.sw_wide, {scope: "/"});
    return reg.scope;
  });
  await attempt("sw_own", async () => {
    const reg = await navigator.serviceWorker.register(cfg.sw_plain);
    return reg.scope;
  });
  document.cookie = "b_own=1; path=/";
  await attempt("own_echo", async () => {
    const r = await fetch(cfg.b_echo, {credentials: "include"});
    return await r.json();
  });
  results.document_cookie = document.cookie;
  // 6: cookies for A, set by B's script (for the parent domain in host mode)
  document.cookie = "tossed=" + cfg.run + cfg.toss;
  document.cookie = "codehub_ws=tossed" + cfg.toss;
  window.__results = results;
  document.getElementById("state").textContent = "done";
})();
</script></body></html>
"""
SW_JS = "self.addEventListener('fetch', () => {});\n"
WRITE = ("import pathlib, sys; pathlib.Path(sys.argv[1]).write_text(sys.argv[2])")


@pytest.fixture(scope="module")
def two_workspaces(echo_upstream: Upstream) -> Iterator[Upstream]:
    """Echo containers A and B on the module's network; B's home holds the attack page."""
    async def start() -> None:
        for wid in (A, B):
            await start_workspace_container(echo_upstream, wid)
        docker = aiodocker.Docker(url=echo_upstream.docker_url)
        try:
            for name, text in (("attack.html", ATTACK_HTML), ("sw.js", SW_JS)):
                code, out = await exec_in(docker, echo_upstream.name_prefix + B,
                                          ["python3", "-c", WRITE, f"/home/coder/{name}", text])
                assert code == 0, out
        finally:
            await docker.close()

    services.run_async(start)
    yield echo_upstream


@dataclass
class Mode:
    host_mode: bool
    port: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])  # marks this test's requests

    def root(self, wid: str) -> str:
        """The URL of a workspace's root, as the browser sees it."""
        if self.host_mode:
            return f"http://{wid}.ws.localhost:{self.port}/"
        return f"http://localhost:{self.port}/w/{wid}/"


async def mode_stack(database_url: str, up: Upstream, tmp_path: Path,
                     host_mode: bool) -> AsyncIterator[tuple[Stack, Mode]]:
    port = free_port()
    settings: dict[str, Any] = {}
    if host_mode:
        settings["workspace_host"] = f"{{id}}.ws.localhost:{port}"
    async for stack in open_stack(database_url, up, tmp_path, port=port,
                                  server=ServerConfig(public_url=f"http://localhost:{port}"),
                                  **settings):
        for wid in (A, B):
            await stack.add(wid)
        yield stack, Mode(host_mode, port)


@pytest.fixture
async def hosted(database_url: str, two_workspaces: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[tuple[Stack, Mode]]:
    async for pair in mode_stack(database_url, two_workspaces, tmp_path, host_mode=True):
        yield pair


@pytest.fixture
async def pathed(database_url: str, two_workspaces: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[tuple[Stack, Mode]]:
    async for pair in mode_stack(database_url, two_workspaces, tmp_path, host_mode=False):
        yield pair


@dataclass
class Outcome:
    results: dict[str, Any]  # what B's page saw
    a_log: list[tuple[str, str]]  # what A's echo server received, (method, raw path)
    cookies: dict[str, str]  # the browser's CodeHub cookie of each workspace (its value)
    jar_for_b: list[dict[str, Any]]  # the cookies the browser would send to B's page
    jar: list[dict[str, Any]]  # every cookie the browser holds in the end
    sent_to_b: list[str]  # Cookie headers of the requests the browser sent to B's root
    sent_to_a: list[str]  # Cookie headers of the requests B's page made to A
    answers: dict[str, int]  # the status of each HTTP answer from A, by attempt


async def echo_log(stack: Stack, mode: Mode, wid: str) -> list[tuple[str, str]]:
    """The request log of a workspace's echo server, read through the gateway."""
    headers = {"Cookie": stack.cookie(wid)}
    if mode.host_mode:
        headers["Host"] = f"{wid}.ws.localhost:{mode.port}"
        url = stack.url("/_echo/requests")
    else:
        url = stack.url(f"/w/{wid}/_echo/requests")
    async with client() as http, http.get(url, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return [(m, p) for m, p in (await resp.json())["requests"]]


async def attack(stack: Stack, mode: Mode) -> Outcome:
    """B's page run once in a fresh browser; its requests are marked with `mode.run`."""
    a_root, b_root = mode.root(A), mode.root(B)
    mark = f"attack={mode.run}-"
    cfg = {
        "a_read": a_root + f"?{mark}read",
        "a_ws": a_root.replace("http://", "ws://") + f"_echo/ws?{mark}websocket",
        "a_post": a_root + f"attack-post?{mark}post",
        "sw_wide": "sw.js?Service-Worker-Allowed=/",
        "sw_plain": "sw.js",
        "b_echo": b_root + f"echo-me?{mark}own_echo",
        "run": mode.run,
        # Path=<A's root>after: sent before A's own cookie (Path=<A's root>) to A's after
        "toss": ("; domain=ws.localhost; path=/after" if mode.host_mode
                 else f"; path=/w/{A}/after"),
    }
    page_url = b_root + "_echo/home/attack.html#" + json.dumps(cfg)
    requests: list[playwright_api.Request] = []
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            page = await context.new_page()
            for wid in (A, B):  # each opened through its own access link, as a user would
                link = await mint(stack, wid)
                assert link.startswith(mode.root(wid) + "?access="), link
                response = await page.goto(link)
                assert response is not None and response.status == 200
                assert page.url == mode.root(wid)
                assert '"method":"GET"' in (await page.inner_text("body")).replace(" ", "")
            ours = {}
            for wid in (A, B):
                (value,) = [c["value"] for c in await context.cookies([mode.root(wid)])
                            if c["name"] == stack.gw.cookie_name]
                ours[wid] = value
            context.on("request", lambda req: requests.append(req))
            answers: dict[str, int] = {}

            def on_response(response: playwright_api.Response) -> None:
                if mark in response.url:
                    answers[response.url.rpartition(mark)[2]] = response.status

            context.on("response", on_response)
            messages: list[str] = []
            page.on("console", lambda msg: messages.append(msg.text))
            page.on("pageerror", lambda exc: messages.append(str(exc)))
            response = await page.goto(page_url)
            assert response is not None and response.status == 200
            try:
                await page.wait_for_function("window.__results !== undefined", timeout=60_000)
            except playwright_api.TimeoutError:
                partial = await page.evaluate("window.__partial")
                raise AssertionError(f"B's page did not finish: {partial}, {messages}, "
                                     f"{response.headers}, {await page.content()}") from None
            results = await page.evaluate("window.__results")
            # The user opens A again, after B's page ran.
            response = await page.goto(a_root + f"after?{mark}after")
            assert response is not None
            results["after"] = {"status": response.status,
                                "body": await page.inner_text("body"),
                                "sent": await response.request.header_value("cookie")}
            jar_for_b, jar = await context.cookies([b_root]), await context.cookies()
            sent_to_b, sent_to_a = [], []
            for req in requests:
                cookie = await req.header_value("cookie") or ""
                if req.url.startswith(b_root):
                    sent_to_b.append(cookie)
                elif req.url.startswith(a_root):
                    sent_to_a.append(cookie)
        finally:
            await browser.close()
    return Outcome(results, await echo_log(stack, mode, A), ours, jar_for_b, jar, sent_to_b,
                   sent_to_a, answers)


def reached(outcome: Outcome, mode: Mode, attempt: str) -> list[tuple[str, str]]:
    """The requests of `attempt` that A's server received, their marks cut off."""
    mark = f"attack={mode.run}-{attempt}"
    return [(m, p.removesuffix(mark) + "attack=" + attempt)
            for m, p in outcome.a_log if p.endswith(mark)]


def cookies_at_a_after_b(outcome: Outcome, mode: Mode) -> list[str]:
    """6: what reaches A's workspace when the user opens A's /after after B's page set
    cookies for it: A's session survives B's `codehub_ws=tossed`, which the browser sends
    first (its Path is longer) and the gateway strips with CodeHub's own; the other
    cookies, as the browser sent them, are returned (a workspace's own cookies are not
    CodeHub's to filter)."""
    after = outcome.results["after"]
    sent = after["sent"].split("; ")
    own = f"{auth.COOKIE_NAME}={outcome.cookies[A]}"
    assert own in sent and sent.index(f"{auth.COOKIE_NAME}=tossed") < sent.index(own), sent
    assert after["status"] == 200, after
    echo = json.loads(after["body"])
    assert echo["raw_path"] == f"/after?attack={mode.run}-after"
    headers = [v for k, v in echo["headers"] if k.lower() == "cookie"]
    assert len(headers) == 1, headers
    return sorted(headers[0].split("; "))


def gateway_cookies(jar: list[dict[str, Any]], where: str = "domain") -> list[tuple[str, str]]:
    """(domain or path, value) of the CodeHub cookies the gateway set (HttpOnly: not the
    ones B's script set) in `jar`."""
    return [(c[where], c["value"]) for c in jar
            if c["name"] == auth.COOKIE_NAME and c["httpOnly"]]


def planted_codehub_cookies(outcome: Outcome) -> list[tuple[str, str, str]]:
    """(domain, path, value) of the cookies named like CodeHub's that the browser holds
    but the gateway did not set (not HttpOnly)."""
    return [(c["domain"], c["path"], c["value"]) for c in outcome.jar
            if c["name"] == auth.COOKIE_NAME and not c["httpOnly"]]


def no_codehub_cookie_reached_b(outcome: Outcome) -> None:
    """5: B's workspace sees the page's own cookie but never one of CodeHub's."""
    own = outcome.results["own_echo"]
    assert own["ok"], own
    cookies = [v for k, v in own["value"]["headers"] if k.lower() == "cookie"]
    assert cookies == ["b_own=1"], cookies
    assert auth.COOKIE_NAME not in outcome.results["document_cookie"]  # HttpOnly


def service_worker_stays_in_its_directory(outcome: Outcome, mode: Mode) -> None:
    """4: scope "/" is refused though B's server allowed it; the default scope works."""
    wide, own = outcome.results["sw_root"], outcome.results["sw_own"]
    assert not wide["ok"] and wide["error"].startswith("SecurityError"), wide
    assert "Service-Worker-Allowed" in wide["error"], wide
    assert own == {"ok": True, "value": mode.root(B) + "_echo/home/"}, own


async def test_workspace_origins_keep_every_attempt_of_another_workspace_page_from_a(
        hosted: tuple[Stack, Mode]) -> None:
    stack, mode = hosted
    outcome = await attack(stack, mode)
    results = outcome.results
    # 1: the answer never reaches B's script (no CORS grant from another origin) ...
    assert not results["read"]["ok"] and results["read"]["error"].startswith("TypeError"), \
        results["read"]
    # ... though the GET itself was sent, with A's cookie (same-site) and let through: a
    # safe method is checked by the cookie alone.
    assert reached(outcome, mode, "read") == [("GET", "/?attack=read")]
    # 2: refused by the gateway before A's server saw anything.
    assert not results["websocket"]["ok"], results["websocket"]
    assert reached(outcome, mode, "websocket") == []
    # 3: the browser hands an opaque answer to the page whatever happened; the gateway
    # refused it (403) and A never got it.
    assert results["post"] == {"ok": True, "value": {"type": "opaque", "status": 0}}
    assert outcome.answers.get("post") == 403, outcome.answers
    assert reached(outcome, mode, "post") == []
    service_worker_stays_in_its_directory(outcome, mode)
    no_codehub_cookie_reached_b(outcome)
    # 6: B's script can set a cookie for the parent domain (siblings are same-site), which
    # then reaches A's workspace; one named like CodeHub's neither reaches it nor ends A's
    # session (on HTTPS the __Host- prefix forbids setting it at all).
    assert cookies_at_a_after_b(outcome, mode) == [f"tossed={mode.run}"]
    assert planted_codehub_cookies(outcome) == [(".ws.localhost", "/after", "tossed")]
    # A's cookie never reaches B's origin: not in the jar for it, not in any request the
    # browser sent there (B's own cookie is). (Playwright shows no Cookie header for a
    # service worker's script fetch: those count as sent without.)
    assert gateway_cookies(outcome.jar_for_b) == [(f"{B}.ws.localhost", outcome.cookies[B])]
    assert outcome.sent_to_b and all(outcome.cookies[A] not in c for c in outcome.sent_to_b)
    assert any(outcome.cookies[B] in c for c in outcome.sent_to_b)


async def test_path_mode_lets_a_page_of_one_workspace_read_and_drive_another(
        pathed: tuple[Stack, Mode]) -> None:
    """What the README and the start-up log warn of, documented by test: one origin for
    all workspaces means their pages are same-origin with each other."""
    stack, mode = pathed
    outcome = await attack(stack, mode)
    results = outcome.results
    # 1: B's page reads A's root: the browser sent A's cookie (Path /w/wsa/ matches).
    read = results["read"]
    assert read["ok"] and read["value"]["status"] == 200, read
    assert json.loads(read["value"]["body"])["raw_path"] == f"/?attack={mode.run}-read"
    assert reached(outcome, mode, "read") == [("GET", "/?attack=read")]
    # 2: and talks to A's WebSocket (its Origin is the shared origin, the workspace's own).
    assert results["websocket"] == {"ok": True, "value": "hello from B"}
    assert reached(outcome, mode, "websocket") == [("GET", "/_echo/ws?attack=websocket")]
    # 3: a same-origin POST passes the Origin check and reaches A.
    assert results["post"] == {"ok": True, "value": {"type": "basic", "status": 200}}
    assert outcome.answers.get("post") == 200, outcome.answers
    assert reached(outcome, mode, "post") == [("POST", "/attack-post?attack=post")]
    assert outcome.sent_to_a and all(outcome.cookies[A] in c for c in outcome.sent_to_a)
    # 4 and 5 are as in host mode.
    service_worker_stays_in_its_directory(outcome, mode)
    no_codehub_cookie_reached_b(outcome)
    # 6: every cookie B's script sets (its own at Path=/ included) reaches A, one named
    # like CodeHub's too (its Path differs from that of A's, so the browser takes it): the
    # gateway strips it, and A's session survives.
    assert cookies_at_a_after_b(outcome, mode) == ["b_own=1", f"tossed={mode.run}"]
    assert planted_codehub_cookies(outcome) == [("localhost", f"/w/{A}/after", "tossed")]
    # B's own requests never carry A's cookie (Path), only B's.
    assert gateway_cookies(outcome.jar_for_b, "path") == [(f"/w/{B}/", outcome.cookies[B])]
    assert outcome.sent_to_b and all(outcome.cookies[A] not in c for c in outcome.sent_to_b)
