"""Logging set-up: text (the default) or one JSON object per line, with request context.

Guarantees:
- `log_format = "json"`: every record is one line holding one JSON object with `time`
  (ISO 8601, UTC, milliseconds), `level`, `logger`, `message`, the exception text as
  `exc_info` when there is one, and, where known, `request_id`, `workspace_id` and `person`
  (from context variables the API and the gateway set per request). Messages are rendered
  with their arguments first, so a line never splits and always parses.
- No secret is logged by CodeHub's own messages (tokens, cookies and access links never
  are arguments of a log call); the JSON formatter adds nothing from the request but the
  three context fields, which hold no secret.
- The access log (`AccessLog`, only at log_level DEBUG) names the method, the path
  WITHOUT its query string (access links carry their token there), the status, the bytes
  sent and the time taken; never a header.
- `request_id_of(header)` keeps a client's `X-Request-Id` when it is 1-128 characters of
  `[A-Za-z0-9._:-]` (so it cannot inject anything into a log line or a header), and
  otherwise makes a new one: 16 hex digits, a random per-process prefix and a counter
  (no system call: the gateway makes one for every proxied request).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import re
import secrets
import sys
from datetime import UTC, datetime

import orjson
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "codehub_request_id", default=None)
WORKSPACE_ID_VAR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "codehub_workspace_id", default=None)
PERSON: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "codehub_person", default=None)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class AccessLog(AbstractAccessLogger):
    """One line per request: method, path without the query, status, bytes, seconds."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info("%s %s %d %d %.6f", request.method, request.path[:512],
                         response.status, response.body_length, time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


well_formed_request_id = _REQUEST_ID.fullmatch


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"


def request_id_of(header: str | None) -> str:
    if header is not None and well_formed_request_id(header):
        return header
    return new_request_id()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, var in (("request_id", REQUEST_ID), ("workspace_id", WORKSPACE_ID_VAR),
                         ("person", PERSON)):
            value = var.get()
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """CodeHub's own stderr handler (replaced, not doubled, by a second `setup`)."""


def setup(level: str, fmt: str) -> None:
    """Root logging to stderr at `level`, as text or JSON lines (`fmt`). Like
    logging.basicConfig, it leaves a root logger that someone else configured (a test
    runner's capture) alone."""
    root = logging.getLogger()
    if any(not isinstance(h, _Handler) for h in root.handlers):
        return
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
