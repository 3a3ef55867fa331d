"""Property-based fuzzing of the admin API against the OpenAPI document it serves.

schemathesis reads GET /api/v1/openapi.json from a live server and, for every operation,
sends generated requests: valid ones (positive) and ones that break the document
(negative). Guarantees checked on every response: no 5xx, status code and body as
documented, invalid input rejected with a 4xx, and a request without the token refused.
Run twice: with a token, and with none configured (the default, loopback only: the
no-token rules of codehub/api.py, Host, Origin and Content-Type, must refuse nothing that
a well-formed request from a loopback script sends; there the "ignored auth" check does
not apply). Bounded: a fixed number of examples per operation, derandomised, so it stays
quick and reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from apitools import LiveServer, auth, make_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    negative_data_rejection,
    positive_data_acceptance,
)

from codehub import api
from codehub.model import DesiredState, Operation, Status

EXAMPLES = 40


SEEDS = ["new-1", "cold-1", "error-1", "warm-1", "running-1", "deleting-1", "archiving-1"]


async def _seed(server: LiveServer) -> None:
    """A workspace in each state where the API's transition rules differ."""
    db = server.store
    await db.create(id="new-1", owner="alice", image_ref="img:1")
    await db.create(id="cold-1", owner="bob", image_ref="img:1",
                    desired_state=DesiredState.COLD)
    await db.compare_and_set("cold-1", expect_status=Status.NEW,
                             expect_operation=Operation.NONE, status=Status.COLD,
                             archive_key="cold-1/home.tar.gz", archive_size=10,
                             archive_sha256="ab" * 32)
    await db.create(id="error-1", owner="carol", image_ref="img:1")
    await db.compare_and_set("error-1", expect_status=Status.NEW,
                             expect_operation=Operation.NONE, status=Status.ERROR,
                             error_from_status=Status.WARM, error_message="start failed",
                             error_count=8, operation=Operation.STARTING)
    for ws_id, status, desired, op in (
            ("warm-1", Status.WARM, DesiredState.WARM, Operation.NONE),
            ("running-1", Status.RUNNING, DesiredState.RUNNING, Operation.NONE),
            ("deleting-1", Status.WARM, DesiredState.DELETED, Operation.DELETING),
            ("archiving-1", Status.WARM, DesiredState.COLD, Operation.ARCHIVING)):
        await db.create(id=ws_id, owner="dave", image_ref="img:1", desired_state=desired)
        await db.compare_and_set(ws_id, expect_status=Status.NEW,
                                 expect_operation=Operation.NONE, status=status, operation=op,
                                 progress_phase="uploading" if op is Operation.ARCHIVING
                                 else None, progress_done=5, progress_total=None)


@pytest.fixture(params=["token", "no-token"])
def live(database_url: str, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    with LiveServer(database_url,
                    make_config(tokens=()) if request.param == "no-token" else None) as server:
        server.run(_seed(server))
        yield server


# Every operation with valid (positive) requests, and those with inputs also with invalid
# (negative) ones: an operation without inputs has nothing to break.
OPERATIONS = [
    pytest.param(r.method, api.PREFIX + r.path, mode, id=f"{r.method} {r.path} {mode.value}")
    for r in api.ROUTES for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode is GenerationMode.POSITIVE or r.path_params or r.query or r.body]


def _excluded(case: schemathesis.Case[Any], tokenless: bool) -> list[Any]:
    # A cursor is opaque: only the API makes valid ones, so a made-up one that the document
    # cannot tell from a real one is rightly refused (400 invalid_cursor). Every other
    # check still applies to such a request. With no token configured the API answers
    # loopback clients without one, by design: a request without Authorization is not
    # invalid there (a case invalid only by that is still checked by everything else).
    excluded = [positive_data_acceptance] if "cursor" in (case.query or {}) else []
    if any(v is None or v == [] for v in (case.query or {}).values()):
        # an "unknown" parameter whose value serialises to nothing is never sent: the
        # request that reaches the API is a valid one, rightly accepted
        excluded.append(negative_data_rejection)
    if tokenless:
        excluded.append(ignored_auth)
        phase = case.meta.phase.data if case.meta is not None else None
        if getattr(phase, "parameter", None) == "Authorization":
            excluded.append(negative_data_rejection)
    return excluded


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_every_response_matches_the_document_and_none_is_a_5xx(
        live: LiveServer, method: str, path: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(live.url + "/api/v1/openapi.json")
    operation = schema[path][method]
    tokenless = live.cfg is not None and not live.cfg.auth.admin_tokens

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case[Any], data: st.DataObject) -> None:
        if mode is GenerationMode.POSITIVE and "id" in (case.path_parameters or {}):
            # Mostly the seeded workspaces: a random id only ever finds a 404.
            generated = case.path_parameters["id"]
            case.path_parameters["id"] = data.draw(st.sampled_from([*SEEDS, generated]))
        case.call_and_validate(base_url=live.url, headers=auth(),
                               excluded_checks=_excluded(case, tokenless))

    check()
