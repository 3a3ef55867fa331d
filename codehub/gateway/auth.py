"""CodeHub's cookie names, and reading them from (and spotting them in) headers.

Guarantees:
- `split_cookie_header` returns every value of our cookie a request carries and the Cookie
  header without them (what the workspace is sent); a header without our cookie costs one
  substring search (it runs on every proxied request).
- `names_our_cookie` is true for an upstream Set-Cookie of any of CodeHub's cookie names
  (the proxy drops those: a workspace cannot set or overwrite CodeHub's credentials).
The credentials themselves (access links, workspace cookies) are signed and verified by
codehub/signing.py.
"""

from __future__ import annotations

COOKIE_NAME = "codehub_ws"
# The name on HTTPS in host mode: a browser accepts it only host-only, Secure, Path=/.
HOST_COOKIE_NAME = "__Host-codehub_ws"
# The sign-in session and flow (sessions.py); on HTTPS in host mode `__Host-` prefixed.
SESSION_COOKIE = "codehub_session"
FLOW_COOKIE = "codehub_signin"
COOKIE_NAMES = frozenset({COOKIE_NAME, HOST_COOKIE_NAME, SESSION_COOKIE, FLOW_COOKIE,
                          "__Host-" + SESSION_COOKIE, "__Host-" + FLOW_COOKIE})


def split_cookie_header(header: str | None, name: str = COOKIE_NAME,
                        ) -> tuple[list[str], str | None]:
    """(the values of our cookie `name`, the Cookie header without them) from a request's
    Cookie header.

    The remainder is None when nothing else is left. A browser may hold more than one
    cookie of that name (one set by a sibling origin for the parent domain, say): every
    value is returned, in order, and all are removed. Shaped for the hot path: a header
    without our cookie costs one substring search.
    """
    if header is None:
        return [], None
    needle = name + "="
    if needle not in header:
        return [], header
    values: list[str] = []
    kept = []
    for part in header.split(";"):
        item = part.strip()
        if item.startswith(needle):
            values.append(item[len(needle):])
        elif item:
            kept.append(item)
    return values, "; ".join(kept) if kept else None


def names_our_cookie(set_cookie: bytes) -> bool:
    """True when an upstream's Set-Cookie value sets one of CodeHub's cookies."""
    name = set_cookie.partition(b"=")[0].strip().decode("latin-1")
    return name in COOKIE_NAMES
