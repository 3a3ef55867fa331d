"""`codehub workspace ...`: a client of a running CodeHub's admin API, for people and scripts.

Guarantees:
- It speaks HTTP to the API only (stdlib urllib, no extra dependency); it never opens the
  database, so it works the same against a local or a remote gateway.
- Target: `--url`, else `$CODEHUB_API_URL`, else `http://<server.host>:<server.port>` from
  the configuration (a wildcard host such as 0.0.0.0 becomes 127.0.0.1). Token:
  `$CODEHUB_ADMIN_TOKEN`, else the first of `auth.admin_tokens`. A token is never taken
  from the command line, where `ps` and shell history would show it.
- Output: a table or `key: value` lines for people; `--json` prints the API's JSON
  unchanged (a list prints one JSON array of every page).
- Exit status: 0 success; 1 the API answered with an error (its status, code and message go
  to stderr) or could not be reached; 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import orjson

from .config import Config

ENV_URL = "CODEHUB_API_URL"
ENV_TOKEN = "CODEHUB_ADMIN_TOKEN"
API = "/api/v1"


class ApiError(Exception):
    """The API answered with an error, or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status or 'no answer'} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class UsageError(Exception):
    """The command line asks for nothing the API can do."""


class Client:
    """The admin API's endpoints as methods returning the decoded JSON."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                query: Mapping[str, Any] | None = None) -> Any:
        url = self.base_url + API + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise _api_error(exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, "unreachable", f"cannot reach {self.base_url}: {reason}") from None

    def create(self, **fields: Any) -> Any:
        return self.request("POST", "/workspaces", _present(fields))

    def pages(self, *, status: str | None = None, owner: str | None = None,
              page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every workspace matching the filters, following cursors page by page."""
        cursor = None
        while True:
            page = self.request("GET", "/workspaces", query={
                "status": status, "owner": owner, "limit": page_size, "cursor": cursor})
            yield from page["items"]
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def get(self, workspace_id: str) -> Any:
        return self.request("GET", f"/workspaces/{_quote(workspace_id)}")

    def update(self, workspace_id: str, **fields: Any) -> Any:
        return self.request("PATCH", f"/workspaces/{_quote(workspace_id)}", fields)

    def delete(self, workspace_id: str) -> Any:
        return self.request("DELETE", f"/workspaces/{_quote(workspace_id)}")

    def restore(self, workspace_id: str, *, start: bool = False) -> Any:
        return self.request("POST", f"/workspaces/{_quote(workspace_id)}/restore",
                            {"start": start})

    def retry(self, workspace_id: str) -> Any:
        return self.request("POST", f"/workspaces/{_quote(workspace_id)}/retry")

    def revoke_access(self, workspace_id: str) -> Any:
        return self.request("POST", f"/workspaces/{_quote(workspace_id)}/revoke-access")

    def access_link(self, workspace_id: str, *, ttl_seconds: int | None = None) -> Any:
        return self.request("POST", f"/workspaces/{_quote(workspace_id)}/access-links",
                            _present({"ttl_seconds": ttl_seconds}))


def _quote(workspace_id: str) -> str:
    return urllib.parse.quote(workspace_id, safe="")


def _present(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        err = orjson.loads(raw)["error"]
        return ApiError(status, str(err["code"]), str(err["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return ApiError(status, "http_error", raw[:200].decode("utf-8", "replace").strip())


def target(cfg: Config, url: str | None, env: Mapping[str, str] | None = None
           ) -> tuple[str, str | None]:
    """(base URL, token) from the command line, the environment and the configuration."""
    env = os.environ if env is None else env
    base = url or env.get(ENV_URL)
    if not base:
        host = cfg.server.host
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        base = f"http://{f'[{host}]' if ':' in host else host}:{cfg.server.port}"
    token = env.get(ENV_TOKEN) or (cfg.auth.admin_tokens[0] if cfg.auth.admin_tokens else None)
    return base, token


# --- parsing and printing ----------------------------------------------------------------

_DURATION = re.compile(r"([0-9]+)([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """Seconds from `90`, `90s`, `15m`, `2h` or `7d` (an argparse type)."""
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 15m, 2h, 7d)")
    return int(m.group(1)) * _UNIT[m.group(2)]


def ttl(text: str) -> int | None:
    """A duration, or `default` (None: the global default)."""
    return None if text == "default" else duration(text)


def home_size(text: str) -> int | None:
    """A home size in MiB (`512`, `512M`, `10G`), or `default` (None)."""
    if text == "default":
        return None
    number, unit = (text[:-1], text[-1].upper()) if text[-1:].isalpha() else (text, "M")
    if not number.isdigit() or unit not in ("M", "G"):
        raise ValueError(f"not a size: {text!r} (512, 512M, 10G or default)")
    return int(number) * (1024 if unit == "G" else 1)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _seconds(n: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}s"


def describe(ws: Mapping[str, Any]) -> str:
    """A workspace as `key: value` lines."""
    lines = [("id", ws["id"]), ("owner", ws["owner"]), ("image", ws["image"]),
             ("status", ws["status"]), ("desired", ws["desired_state"]),
             ("operation", ws["operation"])]
    if ws.get("progress"):
        p = ws["progress"]
        total = "?" if p["total"] is None else _size(p["total"])
        lines.append(("progress", f"{p['phase']} {_size(p['done'])} of {total}"))
    lines += [("last access", ws["last_access_at"]),
              ("warm ttl", _seconds(ws["warm_ttl_seconds"])),
              ("cold ttl", _seconds(ws["cold_ttl_seconds"]))]
    if "home_size_limit_mib" in ws:
        limit = ws["home_size_limit_mib"]
        lines.append(("home size", _size(limit << 20) if limit else "no limit"))
    if ws.get("archive"):
        a = ws["archive"]
        lines.append(("archive", f"{a['key']} ({_size(a['size'])}, sha256 "
                                 f"{a['sha256'] or '?'}, {a['created_at'] or '?'})"))
    if ws.get("error"):
        e = ws["error"]
        lines.append(("error", f"{e['message']} (x{e['count']}, at {e['at'] or '?'})"))
    lines += [("created", ws["created_at"]), ("updated", ws["updated_at"])]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in lines)


_COLUMNS = (("ID", "id"), ("OWNER", "owner"), ("STATUS", "status"),
            ("DESIRED", "desired_state"), ("OPERATION", "operation"),
            ("LAST ACCESS", "last_access_at"))


def table(rows: list[Mapping[str, Any]]) -> str:
    cells = [[h for h, _ in _COLUMNS]]
    for ws in rows:
        cells.append([str(ws[k]) for _, k in _COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in cells)


# --- the command -------------------------------------------------------------------------


def run(args: argparse.Namespace, cfg: Config, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    """Carry out `codehub workspace <action>`; returns the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    base, token = target(cfg, args.url)
    client = Client(base, token)
    try:
        result = _dispatch(client, args)
    except UsageError as exc:
        print(f"codehub: {exc}", file=err)
        return 2
    except ApiError as exc:
        print(f"codehub: {exc}", file=err)
        return 1
    if args.json:
        out.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.action == "list":
        out.write(table(result) + "\n")
    elif args.action == "link":
        out.write(result["url"] + "\n")
        print(f"(valid until {result['expires_at']})", file=err)
    else:
        out.write(describe(result) + "\n")
    return 0


def _list(client: Client, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ws in client.pages(status=args.status, owner=args.owner):
        if args.limit is not None and len(rows) >= args.limit:
            break
        rows.append(ws)
    return rows


def _set(client: Client, args: argparse.Namespace) -> Any:
    fields = {}
    if args.desired is not None:
        fields["desired_state"] = args.desired
    for name in ("warm_ttl", "cold_ttl"):
        if hasattr(args, name):  # left out: argparse.SUPPRESS leaves no attribute
            fields[f"{name}_seconds"] = getattr(args, name)
    if hasattr(args, "home_size"):
        fields["home_size_limit_mib"] = args.home_size
    if not fields:
        raise UsageError("nothing to set: give --desired, --warm-ttl, --cold-ttl or "
                         "--home-size")
    return client.update(args.id, **fields)


_ACTIONS: dict[str, Callable[[Client, argparse.Namespace], Any]] = {
    "create": lambda c, a: c.create(
        id=a.id, owner=a.owner, image=a.image, desired_state=a.desired,
        warm_ttl_seconds=a.warm_ttl, cold_ttl_seconds=a.cold_ttl,
        home_size_limit_mib=a.home_size),
    "list": _list,
    "show": lambda c, a: c.get(a.id),
    "set": _set,
    "delete": lambda c, a: c.delete(a.id),
    "restore": lambda c, a: c.restore(a.id, start=a.start),
    "retry": lambda c, a: c.retry(a.id),
    "revoke": lambda c, a: c.revoke_access(a.id),
    "link": lambda c, a: c.access_link(a.id, ttl_seconds=a.ttl),
}


def _dispatch(client: Client, args: argparse.Namespace) -> Any:
    return _ACTIONS[args.action](client, args)
