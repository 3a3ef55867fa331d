"""Route declarations for the admin API: one table that validates requests and documents them.

Guarantees:
- A `Route` names its path and query parameters and its request body as `Field`s whose
  `schema` is a JSON Schema fragment. `validate_*` check requests against exactly those
  fragments and `document()` copies exactly those fragments into the OpenAPI 3.1 document,
  so the served document and the behaviour cannot drift apart.
- Only the JSON Schema keywords this module enforces may appear in a `Field` schema
  (`SUPPORTED`); declaring any other raises at import time instead of being silently
  documented but not checked.
- Invalid input raises `ApiError` (400) whose message names the offending field; nothing
  a client sends makes validation itself fail with anything else.
- Patterns are matched against the whole value (`re.fullmatch`): `$` never lets a trailing
  newline through.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping


class ApiError(Exception):
    """An error answer: HTTP status, a stable machine-readable code, a sentence for people."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def invalid(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, code, message)


SUPPORTED = frozenset({"type", "enum", "pattern", "minLength", "maxLength", "minimum",
                       "maximum", "default", "description", "examples", "format"})
_JSON_TYPES = {"string": (str,), "integer": (int,), "boolean": (bool,), "null": (type(None),),
               "number": (int, float)}
_INTEGER_TEXT = re.compile(r"-?[0-9]{1,18}")
MAX_BODY = 64 * 1024  # bytes; every body this API accepts is a few hundred bytes


@dataclass(frozen=True, slots=True)
class Field:
    """One parameter or body member: its JSON Schema, what it means, whether it is needed."""

    name: str
    schema: Mapping[str, Any]
    doc: str
    required: bool = False
    _compiled: re.Pattern[str] | None = field(default=None, init=False, repr=False,
                                              compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.schema) - SUPPORTED
        if unknown:
            raise TypeError(f"field {self.name}: unsupported schema keywords {sorted(unknown)}")
        types = self.types
        if not types or not set(types) <= set(_JSON_TYPES):
            raise TypeError(f"field {self.name}: bad type {self.schema.get('type')!r}")
        if "pattern" in self.schema:
            object.__setattr__(self, "_compiled", re.compile(self.schema["pattern"]))

    @property
    def types(self) -> tuple[str, ...]:
        t = self.schema.get("type", ())
        return (t,) if isinstance(t, str) else tuple(t)

    def check(self, value: Any) -> Any:
        """The value if it satisfies the schema (integral floats become ints), else ApiError."""
        kind = _kind(value)
        if kind not in self.types and not (kind == "integer" and "number" in self.types):
            if kind == "number" and "integer" in self.types and float(value).is_integer():
                value, kind = int(value), "integer"  # JSON Schema: 3.0 is an integer
            else:
                raise invalid(f"{self.name}: expected {' or '.join(self.types)}, got {kind}")
        if value is None:
            return None
        enum = self.schema.get("enum")
        if enum is not None and value not in enum:
            raise invalid(f"{self.name}: must be one of {', '.join(map(str, enum))}")
        if isinstance(value, str):
            self._check_string(value)
        elif kind in ("integer", "number"):
            lo, hi = self.schema.get("minimum"), self.schema.get("maximum")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                raise invalid(f"{self.name}: must be between {lo} and {hi}")
        return value

    def _check_string(self, value: str) -> None:
        lo, hi = self.schema.get("minLength", 0), self.schema.get("maxLength")
        if len(value) < lo or (hi is not None and len(value) > hi):
            raise invalid(f"{self.name}: length must be between {lo} and {hi} characters")
        if self._compiled is not None and self._compiled.fullmatch(value) is None:
            raise invalid(f"{self.name}: must match {self.schema['pattern']}")

    def parse_text(self, raw: str) -> Any:
        """A path or query string parameter: typed from its text, then checked."""
        if "integer" in self.types:
            if _INTEGER_TEXT.fullmatch(raw) is None:
                raise invalid(f"{self.name}: expected an integer")
            return self.check(int(raw))
        if "boolean" in self.types:
            if raw not in ("true", "false"):
                raise invalid(f"{self.name}: expected true or false")
            return raw == "true"
        return self.check(raw)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


@dataclass(frozen=True, slots=True)
class Body:
    """A JSON object request body. `optional`: an empty body stands for `{}`."""

    fields: tuple[Field, ...]
    doc: str
    optional: bool = False
    min_fields: int = 0

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "object",
            "properties": {f.name: {**f.schema, "description": f.doc} for f in self.fields},
            "additionalProperties": False,
        }
        required = [f.name for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.min_fields:
            out["minProperties"] = self.min_fields
        return out


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    doc: str
    schema: str | None = None  # a component schema name


@dataclass(frozen=True, slots=True)
class Args:
    """A request's validated inputs."""

    path: dict[str, Any]
    query: dict[str, Any]
    body: dict[str, Any]


Handler = Callable[[web.Request, Args], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str  # below the API prefix, aiohttp syntax: /workspaces/{id}
    name: str  # operationId
    summary: str
    handler: Handler
    replies: tuple[Reply, ...]
    path_params: tuple[Field, ...] = ()
    query: tuple[Field, ...] = ()
    body: Body | None = None
    auth: bool = True
    description: str = ""


def validate_path(route: Route, match_info: Mapping[str, str]) -> dict[str, Any]:
    return {f.name: f.parse_text(match_info[f.name]) for f in route.path_params}


def validate_query(route: Route, query: MultiMapping[str]) -> dict[str, Any]:
    known = {f.name: f for f in route.query}
    out: dict[str, Any] = {}
    for name in query:
        if name not in known:
            raise invalid(f"{_printable(name)}: unknown query parameter", "unknown_parameter")
        values = query.getall(name)
        if len(values) > 1:
            raise invalid(f"{name}: given more than once")
        out[name] = known[name].parse_text(values[0])
    for f in route.query:
        if f.name not in out and "default" in f.schema:
            out[f.name] = f.schema["default"]
    return out


def validate_body(route: Route, raw: bytes) -> dict[str, Any]:
    spec = route.body
    if spec is None:
        return {}
    if not raw.strip() and spec.optional:
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise invalid("request body is not valid JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"request body must be a JSON object, got {_kind(data)}")
    known = {f.name: f for f in spec.fields}
    for name in data:
        if name not in known:
            raise invalid(f"{_printable(name)}: unknown field", "unknown_field")
    for f in spec.fields:
        if f.required and f.name not in data:
            raise invalid(f"{f.name}: required")
    if len(data) < spec.min_fields:
        raise invalid(f"request body needs at least {spec.min_fields} of: "
                      + ", ".join(known))
    return {name: known[name].check(value) for name, value in data.items()}


async def read_body(request: web.Request) -> bytes:
    """The request body, refusing (413) more than MAX_BODY bytes whatever the app's limit."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, "body_too_large", f"request body exceeds {MAX_BODY} bytes")
        chunks.append(chunk)


def _printable(name: str) -> str:
    return repr(name[:64]) if not name.isprintable() or len(name) > 64 else name


# --- the document ------------------------------------------------------------------------


def _parameter(f: Field, where: str) -> dict[str, Any]:
    return {"name": f.name, "in": where, "required": f.required or where == "path",
            "description": f.doc, "schema": dict(f.schema)}


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.name, "summary": route.summary}
    if route.description:
        op["description"] = route.description
    params = ([_parameter(f, "path") for f in route.path_params]
              + [_parameter(f, "query") for f in route.query])
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": not route.body.optional, "description": route.body.doc,
            "content": {"application/json": {"schema": route.body.schema()}}}
    responses: dict[str, Any] = {}
    for reply in route.replies:
        entry: dict[str, Any] = {"description": reply.doc}
        if reply.schema is not None:
            entry["content"] = {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{reply.schema}"}}}
        responses[str(reply.status)] = entry
    op["responses"] = responses
    op["security"] = [{"bearer": []}] if route.auth else []
    return op


def document(routes: tuple[Route, ...], *, prefix: str, title: str, version: str,
             description: str, schemas: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `routes`, mounted at `prefix`."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(prefix + route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, "description": description},
        "paths": paths,
        "components": {
            "schemas": dict(schemas),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "One of the tokens in auth.admin_tokens."}},
        },
    }
