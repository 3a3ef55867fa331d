"""codehub/storage/tarfilter.py without Docker: what a home's tar may bring back, each test
named after a guarantee of the module. Archives are written by Python's tarfile in the
three formats a home's archive can come in (GNU, PAX, USTAR) and read back by it and by
GNU tar."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from codehub.storage.tarfilter import HomeTooLarge, MalformedArchive, TarFilter

FORMATS = [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]
LONG = "coder/" + "d" * 120 + "/file-with-a-long-name-" + "x" * 40


def _add(tf: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, *,
         data: bytes = b"", mode: int = 0o644, uid: int = 1000, gid: int = 1000,
         link: str = "", pax: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid = kind, mode, uid, gid
    info.uname = info.gname = "someone"
    info.linkname, info.mtime = link, 1_700_000_000
    if pax:
        info.pax_headers = pax
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def legit_home(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        _add(tf, "coder", tarfile.DIRTYPE, mode=0o750)
        _add(tf, "coder/run.sh", data=b"#!/bin/sh\necho hi\n", mode=0o755)
        _add(tf, "coder/private", data=b"secret", mode=0o600)
        _add(tf, "coder/shared", tarfile.DIRTYPE, mode=0o1777)
        _add(tf, "coder/link-abs", tarfile.SYMTYPE, link="/etc/passwd")
        _add(tf, "coder/link-rel", tarfile.SYMTYPE, link="run.sh")
        _add(tf, "coder/hardlink", tarfile.LNKTYPE, link="coder/run.sh")
        _add(tf, "coder/fifo", tarfile.FIFOTYPE)
        _add(tf, "coder/big", data=os.urandom(70_000))
        if fmt != tarfile.USTAR_FORMAT:
            _add(tf, LONG, data=b"long")
        if fmt == tarfile.PAX_FORMAT:
            _add(tf, "coder/tagged", data=b"x",
                 pax={"SCHILY.xattr.user.color": "blue",
                      "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"})
    return buf.getvalue()


def hostile_home(fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        _add(tf, "coder", tarfile.DIRTYPE, mode=0o755)
        _add(tf, "coder/ok", data=b"fine")
        _add(tf, "coder/rootshell", data=b"\x7fELF", mode=0o4755, uid=0, gid=0)
        _add(tf, "coder/setgid", data=b"x", mode=0o2755, uid=0, gid=0)
        _add(tf, "coder/other-owned", data=b"x", uid=1234, gid=4321)
        _add(tf, "coder/kmem", tarfile.CHRTYPE)
        _add(tf, "coder/sda", tarfile.BLKTYPE)
        _add(tf, "coder/rootfifo", tarfile.FIFOTYPE, uid=0, gid=0)
        _add(tf, "coder/../etc/cron.d/evil", data=b"* * * * * root sh")
        _add(tf, "/etc/absolute", data=b"x")
        _add(tf, "elsewhere/file", data=b"x")
        _add(tf, "coder/./dot", data=b"x")
        _add(tf, "coder/etc", tarfile.SYMTYPE, link="/etc")
        _add(tf, "coder/etc/passwd", data=b"root::0:0::/:/bin/sh\n")
        _add(tf, "coder/etc", tarfile.DIRTYPE)
        _add(tf, "coder/shadow", tarfile.LNKTYPE, link="/etc/shadow")
        _add(tf, "coder/shadow2", tarfile.LNKTYPE, link="coder/../../etc/shadow")
        _add(tf, "coder/nothing", tarfile.LNKTYPE, link="coder/never-written")
        _add(tf, "coder/after", data=b"still here")
    return buf.getvalue()


def run_filter(data: bytes, piece: int = 1 << 20, **kwargs: int) -> tuple[bytes, TarFilter]:
    f = TarFilter(uid=kwargs.pop("uid", 1000), gid=kwargs.pop("gid", 1000), **kwargs)
    out = b"".join(f.feed(data[i:i + piece]) for i in range(0, len(data), piece))
    return out + f.finish(), f


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


@pytest.mark.parametrize("fmt", FORMATS, ids=["gnu", "pax", "ustar"])
def test_a_legit_home_passes_with_modes_links_contents_and_user_xattrs(fmt: int) -> None:
    source = legit_home(fmt)
    out, f = run_filter(source)
    before, after = members(source), members(out)
    assert list(after) == list(before)
    assert f.dropped == []
    with tarfile.open(fileobj=io.BytesIO(source)) as a, \
            tarfile.open(fileobj=io.BytesIO(out)) as b:
        for name, m in before.items():
            n = after[name]
            assert (n.type, n.mode, n.mtime, n.linkname, n.size) == \
                (m.type, m.mode, m.mtime, m.linkname, m.size), name
            assert (n.uid, n.gid, n.uname, n.gname) == (1000, 1000, "", "")
            if m.isreg():
                assert b.extractfile(n).read() == a.extractfile(m).read()  # type: ignore[union-attr]
    if fmt == tarfile.PAX_FORMAT:
        assert after["coder/tagged"].pax_headers.get("SCHILY.xattr.user.color") == "blue"
        assert "SCHILY.xattr.security.capability" not in after["coder/tagged"].pax_headers
    assert f.real_bytes == sum(m.size for m in before.values() if m.isreg())


@pytest.mark.parametrize("fmt", FORMATS, ids=["gnu", "pax", "ustar"])
def test_dangerous_members_are_dropped_owners_and_setid_bits_rewritten(fmt: int) -> None:
    out, f = run_filter(hostile_home(fmt))
    after = members(out)
    assert sorted(after) == ["coder", "coder/after", "coder/etc", "coder/ok",
                             "coder/other-owned", "coder/rootfifo", "coder/rootshell",
                             "coder/setgid"]
    assert after["coder/etc"].issym()  # the symlink stays; nothing goes through it
    assert after["coder/rootshell"].mode == 0o755 and after["coder/setgid"].mode == 0o755
    assert all((m.uid, m.gid) == (1000, 1000) for m in after.values())
    reasons = dict(f.dropped)
    assert reasons["coder/kmem"] == "character device"
    assert reasons["coder/sda"] == "block device"
    assert reasons["coder/etc/passwd"] == "through a symlink"
    assert reasons["coder/shadow"].startswith("hard link")
    assert reasons["coder/nothing"].startswith("hard link")
    for name in ("coder/../etc/cron.d/evil", "elsewhere/file", "coder/./dot"):
        assert reasons[name] == "outside the home", name
    assert any(name.endswith("etc/absolute") for name in reasons)


@pytest.mark.parametrize("piece", [1, 7, 511, 513, 4096, 65537])
def test_the_output_does_not_depend_on_how_the_input_is_cut(piece: int) -> None:
    for source in (legit_home(tarfile.PAX_FORMAT), hostile_home(tarfile.GNU_FORMAT)):
        assert run_filter(source, piece)[0] == run_filter(source)[0]


def test_gnu_tar_extracts_the_output_and_nothing_lands_outside(tmp_path: Path) -> None:
    """Extracted as root with owners and permissions kept, as Docker's put-archive would."""
    out, _ = run_filter(hostile_home(tarfile.GNU_FORMAT))
    dest = tmp_path / "home"
    dest.mkdir()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    proc = subprocess.run(["tar", "-x", "--same-owner", "--same-permissions", "-C", str(dest)],
                          input=out, capture_output=True)
    assert proc.returncode == 0, proc.stderr
    made = sorted(str(p) for p in tmp_path.rglob("*"))
    assert all(p.startswith(str(dest)) for p in set(made) - set(before))
    shell = dest / "coder" / "rootshell"
    assert shell.stat().st_mode & 0o7777 == 0o755 and shell.stat().st_uid == 1000
    assert (dest / "coder" / "etc").is_symlink()


def test_a_home_over_the_size_limit_is_refused_before_its_last_file() -> None:
    source = legit_home(tarfile.GNU_FORMAT)
    total = run_filter(source)[1].real_bytes
    run_filter(source, size_limit=total)  # exactly at the limit: fine
    with pytest.raises(HomeTooLarge, match="size limit"):
        run_filter(source, size_limit=total - 1)


def test_the_end_marker_comes_only_from_finish_and_only_after_a_complete_stream() -> None:
    source = legit_home(tarfile.GNU_FORMAT)
    f = TarFilter(uid=1000, gid=1000)
    fed = f.feed(source)
    with tarfile.open(fileobj=io.BytesIO(fed)) as tf:
        names = tf.getnames()  # readable, but ends without its two zero blocks
    assert names and not fed.endswith(bytes(1024))
    assert f.finish() == bytes(1024)
    cut = TarFilter(uid=1000, gid=1000)
    cut.feed(source[:len(source) // 2])
    with pytest.raises(MalformedArchive, match="end-of-archive"):
        cut.finish()


def test_a_header_with_a_bad_checksum_or_oversized_metadata_is_malformed() -> None:
    source = bytearray(legit_home(tarfile.GNU_FORMAT))
    source[0] ^= 1
    with pytest.raises(MalformedArchive, match="checksum"):
        run_filter(bytes(source))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "coder/x", data=b"x", pax={"comment": "c" * (2 << 20)})
    with pytest.raises(MalformedArchive, match="metadata"):
        run_filter(buf.getvalue())
