"""The self-service page's own HTTP calls (codehub/gateway/selfservice.py), made by people
signed in through the real oidc-provider's forms, against a real database.

alice@example.test is an admin (the provider's codehub-admins group); bob@other.test is
not. No reconciler runs here: the calls write desired state, which is what is checked.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from gateway_support import ECHO_ID, Stack, Upstream, client
from harness import oidc
from signin_support import ALICE, BOB, browser, signin_stack

from codehub import audit
from codehub.model import DesiredState, Operation, Status

HOME = "/_codehub/auth/home"
SELF = "/_codehub/auth/self/workspaces"


@pytest.fixture
async def signin(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                 ) -> AsyncIterator[Stack]:
    async for s, _ in signin_stack(database_url, echo_upstream, tmp_path):
        yield s


@pytest.fixture
async def allowing(database_url: str, echo_upstream: Upstream, tmp_path: Path,
                   ) -> AsyncIterator[Stack]:
    """Self-service creation and deletion allowed, at most two workspaces a person."""
    async for s, _ in signin_stack(database_url, echo_upstream, tmp_path,
                                   self_service_create=True, self_service_delete=True,
                                   max_workspaces_per_owner=2):
        yield s


async def signed_in(stack: Stack, user: str) -> aiohttp.ClientSession:
    """A browser-like client that signed in as `user` through the provider's forms and
    landed on the page."""
    http = browser()
    hops = await oidc.walk(http, stack.url("/"), user=user, password=oidc.USERS[user],
                           stop=on_the_page(stack))
    assert hops[-1].status == 200 and hops[-1].url == stack.url(HOME), hops[-1].text[:300]
    return http


def on_the_page(stack: Stack) -> Any:
    """Where a walk ends: the page (it has a sign-out form, which walk would submit)."""
    return lambda hop: hop.status == 200 and hop.url == stack.url(HOME)


def same_origin(stack: Stack) -> dict[str, str]:
    return {"Content-Type": "application/json", "Origin": stack.base,
            "Sec-Fetch-Site": "same-origin"}


async def post(http: aiohttp.ClientSession, stack: Stack, path: str, body: Any = None, *,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    async with http.post(stack.url(SELF + path), json=body or {},
                         headers=headers or same_origin(stack)) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def listing(http: aiohttp.ClientSession, stack: Stack, every: bool = False,
                  ) -> dict[str, Any]:
    async with http.get(stack.url(SELF + ("?all=1" if every else ""))) as r:
        assert r.status == 200
        data: dict[str, Any] = await r.json()
        return data


async def desired(stack: Stack, workspace_id: str) -> DesiredState:
    ws = await stack.store.get(workspace_id)
    assert ws is not None
    return ws.desired_state


async def test_root_sends_a_signed_out_browser_through_sign_in_to_the_page(
        signin: Stack) -> None:
    async with browser() as http:
        hops = await oidc.walk(http, signin.url("/"), user="bob", password=oidc.USERS["bob"],
                               stop=on_the_page(signin))
    assert hops[0].status == 303 and hops[0].location == signin.url(HOME)
    assert hops[1].status == 303 and "/auth?" in hops[1].location  # to the provider
    page = hops[-1]
    assert page.status == 200 and page.url == signin.url(HOME)
    assert "Your workspaces" in page.text and "<script>" in page.text
    assert "http://" not in page.text.split("<script>")[0].replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # no CDN: nothing fetched from elsewhere


async def test_without_a_session_the_calls_answer_401_json(signin: Stack) -> None:
    await signin.add("b1", owner=BOB)
    async with client() as http:
        async with http.get(signin.url(SELF)) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "signed_out"
        status, body = await post(http, signin, "/b1/stop")
        assert status == 401 and body["error"]["code"] == "signed_out"
    assert await desired(signin, "b1") is DesiredState.RUNNING


async def test_a_person_lists_their_own_workspaces_and_an_admin_may_list_all(
        signin: Stack) -> None:
    await signin.add("a1", owner=ALICE)
    await signin.add("b1", owner=BOB, status=Status.WARM)
    await signin.add("b2", owner=BOB, status=Status.COLD, archive_key="k", archive_size=5 << 20)
    async with await signed_in(signin, "bob") as bob:
        mine = await listing(bob, signin)
        assert mine["person"] == BOB and mine["admin"] is False
        assert [w["id"] for w in mine["items"]] == ["b1", "b2"]
        assert await listing(bob, signin, every=True) == mine  # not an admin: still his own
        shown = mine["items"][1]
        assert shown["status"] == "COLD" and shown["archive"]["size"] == 5 << 20
        assert "key" not in shown["archive"] and "image" not in shown
        assert shown["warm_ttl_seconds"] > 0 and shown["cold_ttl_seconds"] > 0
        assert shown["last_access_at"].endswith("Z")
    async with await signed_in(signin, "alice") as alice:
        assert [w["id"] for w in (await listing(alice, signin))["items"]] == ["a1"]
        everyone = await listing(alice, signin, every=True)
        assert everyone["all"] is True and [w["id"] for w in everyone["items"]] == [
            "a1", "b1", "b2"]


@pytest.mark.parametrize("headers", [
    {"Content-Type": "text/plain"},  # what a cross-site form or a simple fetch can send
    {"Content-Type": "application/x-www-form-urlencoded"},
    {"Content-Type": "application/json"},  # no Origin
    {"Content-Type": "application/json", "Origin": "http://evil.example"},
    {"Content-Type": "application/json", "Origin": "null"},
    {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"},
])
async def test_a_post_that_is_not_same_origin_json_is_refused_403_and_writes_nothing(
        signin: Stack, headers: dict[str, str]) -> None:
    await signin.add("b1", owner=BOB)
    headers = {"Origin": signin.base, **headers} if "Sec-Fetch-Site" in headers else headers
    async with (await signed_in(signin, "bob") as bob,
                bob.post(signin.url(SELF + "/b1/stop"), data=b"{}", headers=headers) as r):
        assert r.status == 403 and (await r.json())["error"]["code"] == "cross_site"
    assert await desired(signin, "b1") is DesiredState.RUNNING


async def test_another_persons_workspace_answers_403_and_an_admin_may_act_on_any(
        signin: Stack) -> None:
    await signin.add("a1", owner=ALICE)
    await signin.add("b1", owner=BOB)
    async with await signed_in(signin, "bob") as bob:
        for verb in ("open", "stop", "archive", "restore", "delete"):
            status, body = await post(bob, signin, f"/a1/{verb}")
            assert status == 403 and body["error"]["code"] == "not_yours", verb
        async with bob.get(signin.url(SELF + "/a1/events")) as r:
            assert r.status == 403
        status, body = await post(bob, signin, "/nope/stop")
        assert status == 404 and body["error"]["code"] == "not_found"
    assert await desired(signin, "a1") is DesiredState.RUNNING
    async with await signed_in(signin, "alice") as alice:
        status, body = await post(alice, signin, "/b1/stop")
        assert status == 202 and body["workspace"]["desired_state"] == "WARM"
    assert await desired(signin, "b1") is DesiredState.WARM


async def test_stop_archive_and_restore_write_desired_state_by_the_apis_rules_and_hint(
        signin: Stack) -> None:
    await signin.add("b1", owner=BOB)
    hints = signin.hints.subscribe()
    assert await anext(hints) is None
    async with await signed_in(signin, "bob") as bob:
        status, body = await post(bob, signin, "/b1/stop")
        assert status == 202 and body["workspace"]["desired_state"] == "WARM"
        assert await asyncio.wait_for(anext(hints), 10) == "b1"
        status, body = await post(bob, signin, "/b1/restore")
        assert status == 409 and body["error"]["code"] == "not_cold"
        status, body = await post(bob, signin, "/b1/archive")
        assert status == 202 and body["workspace"]["desired_state"] == "COLD"
        assert await asyncio.wait_for(anext(hints), 10) == "b1"
        row = await signin.store.compare_and_set(  # as the reconciler would, once archived
            "b1", expect_status=Status.RUNNING, expect_operation=Operation.NONE,
            status=Status.COLD, archive_key="k", archive_size=1)
        assert row is not None
        for verb in ("open", "stop"):  # archived: back only through a restore
            status, body = await post(bob, signin, f"/b1/{verb}")
            assert status == 409 and body["error"]["code"] == "restore_required", verb
        status, body = await post(bob, signin, "/b1/restore")
        assert status == 202 and body["workspace"]["desired_state"] == "WARM"
        status, body = await post(bob, signin, "/b1/restore", {"start": "yes"})
        assert status == 400
        status, body = await post(bob, signin, "/b1/stop", {"desired_state": "RUNNING"})
        assert status == 400 and "takes no desired_state" in body["error"]["message"]
    await hints.aclose()


async def test_open_wakes_a_warm_workspace_and_answers_an_access_link(signin: Stack) -> None:
    await signin.add(ECHO_ID, owner=BOB, status=Status.WARM)
    async with await signed_in(signin, "bob") as bob:
        status, body = await post(bob, signin, f"/{ECHO_ID}/open")
        assert status == 200 and body["workspace"]["desired_state"] == "RUNNING"
        assert body["url"].startswith(signin.url(f"/w/{ECHO_ID}/?access="))
        assert await desired(signin, ECHO_ID) is DesiredState.RUNNING
        async with bob.get(body["url"], headers={"Accept": "text/html"}) as r:
            assert r.status == 200  # the link works (the loading page, or the workspace)


async def test_create_and_delete_exist_only_when_the_operator_allows_them(
        signin: Stack) -> None:
    await signin.add("b1", owner=BOB)
    async with await signed_in(signin, "bob") as bob:
        assert (await listing(bob, signin))["can_create"] is False
        status, body = await post(bob, signin, "")
        assert status == 403 and body["error"]["code"] == "not_allowed"
        status, body = await post(bob, signin, "/b1/delete")
        assert status == 403 and body["error"]["code"] == "not_allowed"
    assert await desired(signin, "b1") is DesiredState.RUNNING
    assert len(await signin.store.list_page(owner=BOB)) == 1


async def test_a_person_creates_within_the_owner_limit_and_an_admin_is_not_limited(
        allowing: Stack) -> None:
    async with await signed_in(allowing, "bob") as bob:
        listed = await listing(bob, allowing)
        assert listed["can_create"] and listed["max_workspaces"] == 2
        # Many at once: the limit holds (the owner's creations are serialised).
        answers = await asyncio.gather(*(post(bob, allowing, "") for _ in range(5)))
        assert sorted(s for s, _ in answers) == [201, 201, 409, 409, 409]
        refused = next(b for s, b in answers if s == 409)
        assert refused["error"]["code"] == "owner_limit"
        created = [b["workspace"] for s, b in answers if s == 201]
        assert all(w["owner"] == BOB and w["desired_state"] == "RUNNING" for w in created)
        status, body = await post(bob, allowing, "", {"owner": ALICE})
        assert status == 403 and body["error"]["code"] == "not_yours"
        # Deleting one makes room for another.
        status, body = await post(bob, allowing, f"/{created[0]['id']}/delete")
        assert status == 202 and body["workspace"]["desired_state"] == "DELETED"
        status, _ = await post(bob, allowing, "")
        assert status == 201
    async with await signed_in(allowing, "alice") as alice:
        assert (await listing(alice, allowing))["max_workspaces"] is None
        status, body = await post(alice, allowing, "", {"owner": BOB})  # over bob's limit
        assert status == 201 and body["workspace"]["owner"] == BOB
    assert len([w for w in await allowing.store.list_page(owner=BOB)
                if w.desired_state is not DesiredState.DELETED]) == 3


async def test_every_action_is_audited_with_the_person(allowing: Stack) -> None:
    await allowing.add("a1", owner=ALICE)
    await allowing.add("b1", owner=BOB)
    async with await signed_in(allowing, "bob") as bob:
        async with bob.post(allowing.url(SELF + "/b1/stop"), json={},
                            headers={**same_origin(allowing), "X-Request-Id": "rid-stop-1"}) as r:
            assert r.status == 202 and r.headers["X-Request-Id"] == "rid-stop-1"
        await post(bob, allowing, "/a1/archive")  # refused: not his
        status, body = await post(bob, allowing, "")
        assert status == 201
        new_id = body["workspace"]["id"]
        await post(bob, allowing, "/b1/stop", headers={"Content-Type": "text/plain"})
    async with await signed_in(allowing, "alice") as alice:
        await post(alice, allowing, "/b1/archive")
    log = audit.AuditLog(allowing.store)
    bobs = [(e.action, e.workspace_id, e.status) for e in reversed(
        await log.page(before_id=None, limit=20, actor="person:" + BOB))]
    assert bobs == [("self.stop", "b1", 202), ("self.archive", "a1", 403),
                    ("self.create", new_id, 201), ("self.stop", "b1", 403)]
    first = (await log.page(before_id=None, limit=20, actor="person:" + BOB))[-1]
    assert first.request_id == "rid-stop-1" and first.detail == {"admin": False}
    alices = await log.page(before_id=None, limit=20, actor="person:" + ALICE)
    assert [(e.action, e.workspace_id, e.status, e.detail["admin"]) for e in alices] == [
        ("self.archive", "b1", 202, True)]


async def test_the_event_stream_is_the_loading_pages_for_the_owner(signin: Stack) -> None:
    await signin.add(ECHO_ID, owner=BOB, status=Status.WARM)
    async with (await signed_in(signin, "bob") as bob,
                bob.get(signin.url(SELF + f"/{ECHO_ID}/events")) as r):
        assert r.status == 200 and r.content_type == "text/event-stream"
        assert await r.content.readline() == b"event: state\r\n"
        data = (await r.content.readline()).decode()
        assert data.startswith("data: ") and '"status":"WARM"' in data


async def test_without_oidc_there_is_no_page_and_no_calls(stack: Stack) -> None:
    await stack.add("b1", owner=BOB)
    async with client() as http:
        for path in ("/", HOME, SELF, SELF + "/b1/events"):
            async with http.get(stack.url(path), allow_redirects=False) as r:
                assert r.status == 404, path
        async with http.post(stack.url(SELF + "/b1/stop"), json={},
                             headers=same_origin(stack)) as r:
            assert r.status == 404
    assert await desired(stack, "b1") is DesiredState.RUNNING
