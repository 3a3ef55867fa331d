"""Writing settings out: the documented example file and the secret-free start-up record.

Guarantees:
- `example_toml()` shows every key with its default, its `doc` and its range or choices,
  section by section in declaration order; `codehub config example` prints it.
- `describe_secret_free()` never shows a secret's value (a set secret is `***`).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from .loader import tables
from .sections import Config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def example_toml() -> str:
    """The documented example file: every key, its default, what it does."""
    out = ["# CodeHub configuration. Every key is shown with its default.",
           "# Environment overrides: CODEHUB_<SECTION>__<KEY> (e.g. CODEHUB_SERVER__PORT=9000),",
           "# CODEHUB_<KEY> for top-level keys. Lists in the environment are comma-separated.",
           "# A section left out (or an empty url) selects the embedded default for it.", ""]

    def emit(cls: type, obj: Any) -> None:
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue
            doc = f.metadata["doc"]
            extra = []
            if f.metadata.get("choices"):
                extra.append("one of " + ", ".join(f.metadata["choices"]))
            if f.metadata.get("lo") is not None or f.metadata.get("hi") is not None:
                extra.append(f"range {f.metadata['lo']:g}..{f.metadata['hi']:g}")
            out.append(f"# {doc}" + (f" ({'; '.join(extra)})" if extra else ""))
            out.append(f"{f.name} = {_toml_value(getattr(obj, f.name))}")

    defaults = Config()
    emit(Config, defaults)
    for sname, scls in tables().items():
        out.append("")
        out.append(f"[{sname}]")
        out.append("# " + " ".join((scls.__doc__ or "").split()))
        obj: Any = defaults
        for part in sname.split("."):
            obj = getattr(obj, part)
        emit(scls, obj)
    return "\n".join(out) + "\n"


def describe_secret_free(cfg: Config) -> dict[str, Any]:
    """The settings with secrets masked, for logging at start-up."""
    def walk(cls: type, obj: Any) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                res[f.name] = walk(type(v), v)
            elif f.metadata.get("secret") and v:
                res[f.name] = "***"
            else:
                res[f.name] = v
        return res
    return walk(Config, cfg)
