"""The gateway's pages (codehub/gateway/pages.py) as templates: they come from the
repository's top-level static/ (shipped as codehub/static in the wheel, which
test_gateway_image.py checks), share one <head>, and a gateway.static_dir made before the
shared <head> existed still renders. Pure: no service needed."""

from __future__ import annotations

import shutil
from pathlib import Path

from codehub.gateway.pages import PACKAGE_STATIC, TEMPLATES, Pages

ROOT = Path(__file__).resolve().parents[2]


def rendered(pages: Pages, name: str) -> str:
    return pages._render(name, {"workspace": "w1", "title": "T", "status": "404"})


def test_the_pages_come_from_the_top_level_static_directory() -> None:
    assert PACKAGE_STATIC == ROOT / "static"
    assert all((PACKAGE_STATIC / name).is_file() for name in TEMPLATES)


def test_every_page_opens_with_the_one_shared_head() -> None:
    head = (PACKAGE_STATIC / "head.html").read_text(encoding="utf-8").rstrip("\n")
    pages = Pages(PACKAGE_STATIC)
    for name in TEMPLATES:
        assert (PACKAGE_STATIC / name).read_text(encoding="utf-8").startswith("{{head}}\n")
        page = rendered(pages, name)
        assert page.startswith(head + "\n") and "{{" not in page, name


def test_a_static_dir_without_the_shared_head_falls_back_to_the_package_one(
        tmp_path: Path) -> None:
    shutil.copytree(PACKAGE_STATIC, tmp_path, dirs_exist_ok=True)
    (tmp_path / "head.html").unlink()
    own, ours = Pages(tmp_path), Pages(PACKAGE_STATIC)
    for name in TEMPLATES:
        assert rendered(own, name) == rendered(ours, name)
