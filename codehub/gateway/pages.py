"""The gateway's own pages: loading (auto-wake), COLD, errors (401/403/404/502/503), and
the self-service page (selfservice.py).

Guarantees:
- Every page is one self-contained HTML response: the stylesheet and script from
  `static/` are inlined when the templates are loaded (once, at start-up), so a page needs
  no further request, no external font and no CDN, and renders even for a visitor without
  a cookie. The four pages share one <head> (`static/head.html`, the `{{head}}` slot).
- Every value put into a page is HTML-escaped; the state embedded for the loading page's
  script is JSON with `<`, `>` and `&` escaped, so no workspace data can break out.
- Pages are never cached (`Cache-Control: no-store`): they describe a moment.
- Clients that do not ask for HTML get the same status with a one-line text body (and
  `Retry-After` where retrying helps).
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import orjson
from aiohttp import web

from ..model import Workspace
from ..view import workspace_state


def _package_static() -> Path:
    """codehub/static in an installed wheel (setup.py maps the repository's static/ there);
    the repository's static/ itself in a source tree, as an editable install runs."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "static"
    return shipped if shipped.is_dir() else package.parent / "static"


PACKAGE_STATIC = _package_static()
TEMPLATES = ("loading.html", "cold.html", "error.html", "portal.html")
_SLOT = re.compile(r"\{\{(\w+)\}\}")
NO_STORE = "no-store"


def static_dir(configured: str) -> Path:
    return Path(configured).expanduser() if configured else PACKAGE_STATIC


def _json_for_script(data: object) -> str:
    return (orjson.dumps(data).decode().replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


def _own_or_ours(directory: Path, name: str) -> str:
    """A page of gateway.static_dir; the self-service page's files and the shared <head>
    fall back to the package's (a static_dir made before they existed still works)."""
    path = directory / name
    if not path.exists() and (name.startswith("portal.") or name == "head.html"):
        path = PACKAGE_STATIC / name
    return path.read_text(encoding="utf-8")


class Pages:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        css = (directory / "codehub.css").read_text(encoding="utf-8")
        js = (directory / "codehub.js").read_text(encoding="utf-8")
        portal_js = _own_or_ours(directory, "portal.js")
        # The <head> the pages share (charset, viewport, robots), before their own lines.
        head = _own_or_ours(directory, "head.html").rstrip("\n")
        self._templates: dict[str, str] = {}
        for name in TEMPLATES:
            text = _own_or_ours(directory, name).replace("{{head}}", head.replace("{{", "{ {"))
            # Inlined once here; a stylesheet or script can hold no "{{" of its own.
            self._templates[name] = (text.replace("{{css}}", css.replace("{{", "{ {"))
                                     .replace("{{js}}", js.replace("{{", "{ {"))
                                     .replace("{{portal_js}}", portal_js.replace("{{", "{ {")))

    def _render(self, name: str, values: dict[str, str], raw: dict[str, str] | None = None,
                ) -> str:
        escaped = {k: html.escape(v) for k, v in values.items()}
        if raw:
            escaped.update(raw)
        return _SLOT.sub(lambda m: escaped.get(m.group(1), ""), self._templates[name])

    @staticmethod
    def _response(status: int, body: str, extra: dict[str, str] | None = None,
                  ) -> web.Response:
        headers = {"Cache-Control": NO_STORE, "X-Content-Type-Options": "nosniff",
                   "Referrer-Policy": "no-referrer"}
        if extra:
            headers.update(extra)
        return web.Response(status=status, text=body, content_type="text/html",
                            charset="utf-8", headers=headers)

    def loading(self, workspace_id: str, ws: Workspace | None, base: str) -> web.Response:
        """`base`: the path the workspace's root is served at (its events are below it)."""
        state = workspace_state(ws)
        body = self._render(
            "loading.html",
            {"workspace": workspace_id, "base": base},
            {"state_json": _json_for_script(state)})
        return self._response(200, body)

    def cold(self, workspace_id: str, ws: Workspace | None) -> web.Response:
        archive = ""
        shown = ws.archive if ws is not None else None
        if shown is not None and shown.created_at is not None:
            archive = (f"Archived {shown.created_at:%Y-%m-%d %H:%M} UTC, "
                       f"{(shown.size or 0) / 1048576:.1f} MiB.")
        progress = ""
        moving = ws.progress if ws is not None else None
        if moving is not None and moving.phase:
            total = moving.total
            progress = f"{moving.phase}: {moving.done / 1048576:.1f} MiB" + (
                f" of {total / 1048576:.1f} MiB" if total else "")
        operation = ws.operation.value if ws is not None else "NONE"
        # While an archive or restore runs, the page refreshes itself to show progress.
        refresh = '<meta http-equiv="refresh" content="5">' if operation != "NONE" else ""
        body = self._render("cold.html", {
            "workspace": workspace_id, "archive": archive, "progress": progress,
            "operation": operation,
        }, {"refresh": refresh})
        return self._response(502, body)

    def portal(self) -> web.Response:
        """The self-service page (selfservice.py); it fetches its data itself."""
        return self._response(200, self._render("portal.html", {}))

    def error(self, status: int, title: str, message: str, *, workspace_id: str = "",
              detail: str = "", retry_after: int | None = None) -> web.Response:
        body = self._render("error.html", {
            "status": str(status), "title": title, "message": message,
            "workspace": workspace_id, "detail": detail,
            "detail_hidden": "" if detail else "hidden",
        })
        extra = {"Retry-After": str(retry_after)} if retry_after else None
        return self._response(status, body, extra)


def plain(status: int, message: str, *, retry_after: int | None = None) -> web.Response:
    """The answer to a client that did not ask for HTML."""
    headers = {"Cache-Control": NO_STORE}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.Response(status=status, text=message + "\n", headers=headers)
