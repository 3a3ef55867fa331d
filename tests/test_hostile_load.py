"""Acceptance item 2 of issue 13: under hostile load (half-open connections up to and beyond
the per-client limit, 2,000 slow-header connections, 3,000 event streams) 1,000 well-behaved
connections over 100 RUNNING workspaces are served for 60 s with 0 errors, and the hostile
connections are refused or dropped as configured.

bench/load.py does the work (a real gateway process served by cli.serve_app, an upstream
process, rows in the real PostgreSQL); this test runs it and checks what it reports. The
only timing bounds are the ones the guarantees name (header_timeout + a few seconds; "at
once" for a connection over the limit: within a second)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT = 10.0
DURATION = float(os.environ.get("CODEHUB_TEST_LOAD_DURATION", "60"))
pytestmark = pytest.mark.alone  # its p99 and "longest without success" are its own load's

NEEDED_FDS = 1000 + 256 + 50 + 2000 + 3000 + 1000  # clients, half-open, streams, headroom


@pytest.mark.timeout(300)
def test_well_behaved_clients_keep_being_served_while_hostile_connections_are_dropped(
        database_url: str) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < NEEDED_FDS:
        pytest.skip(f"the descriptor hard limit {hard} is below the {NEEDED_FDS} this needs")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), "run", "--database-url", database_url,
         "--duration", str(DURATION), "--header-timeout", str(HEADER_TIMEOUT),
         *os.environ.get("CODEHUB_TEST_LOAD_ARGS", "").split()],
        capture_output=True, text=True, timeout=240,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("CODEHUB_")},
             "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout)
    print(json.dumps(report, indent=2))  # the figures, for the README (pytest -s)
    well = report["well_behaved"]
    assert well["errors"] == {}, report["gateway_log_tail"]
    assert well["requests_ok"] >= well["connections"] * DURATION / 2 / 4  # served throughout
    measured = report["measured"]  # its errors count among the well-behaved ones above
    assert measured["longest_without_success_s"] < 5
    assert measured["readyz_errors"] == 0 and measured["readyz_ok"] >= DURATION * 0.5
    half = report["half_open"]
    # beyond the per-client limit: closed at once, before any HTTP (a probe that came just
    # as a holder was dropped took its slot, and then lived like one)
    assert half["refused"] >= 0.8 * half["probe_attempts"] > 0, half
    assert half["refused_closed_after_max_ms"] < 1000, half
    assert half["admitted_lived_max_s"] <= HEADER_TIMEOUT + 3, half
    # within the limit but silent: dropped by the header timeout
    assert half["holders_dropped"] >= half["limit"]
    assert half["holders_lived_max_s"] <= HEADER_TIMEOUT + 3, half
    slow = report["slow_headers"]
    assert slow["dropped"] >= slow["connections"]
    assert slow["lived_max_s"] <= HEADER_TIMEOUT + 3
    assert report["refused_by_reason"]["per_client"] >= half["refused"]
    assert report["refused_by_reason"]["header_timeout"] >= slow["dropped"]
    # event streams: answered (a stream or a clear refusal), never left hanging
    assert sum(report["event_streams"]["answers"].values()) >= report["event_streams"][
        "connections"]
