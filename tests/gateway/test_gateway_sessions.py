"""Signed session and flow cookies (codehub/gateway/sessions.py): no database, bounded life,
purposes apart, key rotation, per-person not-before."""

from __future__ import annotations

from codehub.gateway.oidc import Flow, Identity
from codehub.gateway.sessions import Scope, Signer
from codehub.signing import SigningKeys

KEYS = SigningKeys((b"session-test-key-new", b"session-test-key-old"))
ALICE = Identity("alice@example.test", admin=False)


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def test_a_session_verifies_until_it_expires() -> None:
    clock = Clock()
    signer = Signer(KEYS, clock)
    value, made = signer.session(ALICE, ttl=600)
    assert signer.check_session(value) == made
    assert made.expires_at - made.issued_at == 600
    clock.t += 599
    assert signer.check_session(value) is not None
    clock.t += 1
    assert signer.check_session(value) is None


def test_a_flow_cannot_stand_in_for_a_session_nor_a_session_for_a_flow() -> None:
    signer = Signer(KEYS, Clock())
    flow = signer.flow(Flow.new(), "/_codehub/auth/open/x?path=%2F")
    session, _ = signer.session(ALICE, ttl=600)
    assert signer.check_session(flow) is None
    assert signer.check_flow(session) is None
    pending = signer.check_flow(flow)
    assert pending is not None and pending.next_path == "/_codehub/auth/open/x?path=%2F"


def test_forged_tampered_and_foreign_key_values_are_refused() -> None:
    clock = Clock()
    signer = Signer(KEYS, clock)
    value, _ = signer.session(ALICE, ttl=600)
    head, body, mac = value.split(".")
    other = Signer(SigningKeys((b"someone-elses-key-123",)), clock)
    forged, _ = other.session(Identity("alice@example.test", admin=True), ttl=600)
    for bad in (forged, f"{head}.{body}.{mac[::-1]}", f"{head}.{body}.", "", "x" * 5000,
                "a.b.c", value + "x"):
        assert signer.check_session(bad) is None, bad


def test_rotated_keys_the_first_signs_and_all_verify() -> None:
    clock = Clock()
    old = Signer(SigningKeys((b"session-test-key-old",)), clock)
    value, _ = old.session(ALICE, ttl=600)
    assert Signer(KEYS, clock).check_session(value) is not None
    new_value, _ = Signer(KEYS, clock).session(ALICE, ttl=600)
    assert old.check_session(new_value) is None  # signed by the new key


def test_a_persons_not_before_refuses_their_earlier_sessions_only() -> None:
    clock = Clock()
    signer = Signer(KEYS, clock)
    early, _ = signer.session(ALICE, ttl=600)
    bobs, _ = signer.session(Identity("bob@other.test", admin=False), ttl=600)
    clock.t += 10
    signer.not_before.revoke(ALICE.person, int(clock.t))
    assert signer.check_session(early) is None
    assert signer.check_session(bobs) is not None
    later, _ = signer.session(ALICE, ttl=600)
    assert signer.check_session(later) is not None


def test_cookies_are_host_prefixed_only_on_https_in_host_mode() -> None:
    assert Scope.of(host_mode=True, https=True) == Scope(
        "__Host-codehub_session", "__Host-codehub_signin", "/")
    for host_mode, https in ((False, True), (True, False), (False, False)):
        assert Scope.of(host_mode, https) == Scope(
            "codehub_session", "codehub_signin", "/_codehub/auth/")
