"""A streaming filter that makes a home's tar safe to extract: pure byte code, no Docker.

An archive comes back from object storage, where whoever can write the bucket (and the
row's sha256) could have put anything; and even an honest archive holds whatever the
workspace's user (or an admin's `docker exec -u 0`) left in the home. Before a single byte
reaches an extractor (GNU tar in a helper, or Docker's put-archive, which runs as root and
restores owners, modes and device nodes as written), every member passes through here.

Guarantees:
- Every member that is emitted lies below the top entry `top/` (the volume root) by a
  clean relative path: no absolute name, no `.` or `..` component, no empty component,
  and no path that runs through a symlink emitted earlier (symlink-then-write). Hard
  links name a regular file emitted earlier under the same rules.
- Emitted members are directories, regular files, symlinks, hard links and FIFOs only:
  device nodes, GNU sparse/multi-volume/dump entries and unknown types are dropped.
- Every emitted member is owned by `uid:gid` (names cleared) and has no setuid or setgid
  bit; the other mode bits, the mtime, the contents and `user.` extended attributes
  (PAX `SCHILY.xattr.user.*`) pass unchanged; every other extended attribute is dropped.
- Long names come out as a PAX header of our own; global PAX headers are dropped.
- `real_bytes` is the sum of the sizes of the regular files emitted; once it would exceed
  `size_limit` the filter raises HomeTooLarge (before emitting that file).
- The end-of-archive marker is emitted only by `finish()`, and `finish()` raises unless
  the input ended with one: a caller that calls `finish()` only after verifying the
  stream never hands an extractor a complete archive that did not verify.
- A malformed header (bad checksum, bad number, oversized metadata) raises
  MalformedArchive. Memory is bounded: one header plus at most MAX_META bytes of PAX/GNU
  metadata are held; file data is passed on as it comes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..interfaces import IntegrityError, PermanentError

BLOCK = 512
MAX_META = 1 << 20  # bytes of one PAX or GNU long-name entry we accept
_REGULAR = (b"0", b"\0", b"7")
_KEPT = (*_REGULAR, b"1", b"2", b"5", b"6")
_DROPPED_PAX = (b"uid", b"gid", b"uname", b"gname", b"path", b"linkpath", b"atime", b"ctime")


class MalformedArchive(IntegrityError):
    """The tar stream is not one we can read safely."""


class HomeTooLarge(PermanentError):
    """The home's files add up to more than the size limit."""


def _number(field_: bytes, what: str) -> int:
    if field_ and field_[0] & 0x80:  # GNU base-256
        value = field_[0] & 0x3F
        for byte in field_[1:]:
            value = (value << 8) | byte
        return -value if field_[0] & 0x40 else value
    text = field_.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise MalformedArchive(f"tar header field {what} is not a number: {text!r}") from None


def _pax_size(value: bytes) -> int:
    try:
        size = int(value)
    except ValueError:
        raise MalformedArchive("PAX size is not a number") from None
    if size < 0:
        raise MalformedArchive("negative PAX size")
    return size


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _pax_records(data: bytes) -> list[tuple[bytes, bytes]]:
    records = []
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            if data[pos:].strip(b"\0") == b"":
                break
            raise MalformedArchive("PAX header without a length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise MalformedArchive("PAX record length is not a number") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise MalformedArchive("PAX record overruns its header")
        key, sep, value = data[space + 1:end - 1].partition(b"=")
        if not sep:
            raise MalformedArchive("PAX record without '='")
        records.append((key, value))
        pos = end
    return records


def _pax_entry(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _clean(path: bytes, top: bytes) -> bytes | None:
    """The member's path without a trailing slash, or None when it is not a clean path
    below (or at) `top`."""
    parts = path.rstrip(b"/").split(b"/")
    if parts[0] != top:
        return None
    if any(p in (b"", b".", b"..") for p in parts):
        return None
    return b"/".join(parts)


@dataclass
class TarFilter:
    """`feed()` each piece of the tar as it comes, then `finish()`; both return the bytes
    to pass on."""

    uid: int
    gid: int
    top: bytes = b"coder"
    size_limit: int | None = None
    real_bytes: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)
    _buf: bytearray = field(default_factory=bytearray)
    _skip: int = 0        # bytes of a dropped member's data still to skip
    _copy: int = 0        # bytes of an emitted member's data still to pass on
    _meta_kind: bytes = b""
    _meta_left: int = 0
    _meta_size: int = 0
    _meta: bytearray = field(default_factory=bytearray)
    _pax: list[tuple[bytes, bytes]] = field(default_factory=list)
    _long_name: bytes | None = None
    _long_link: bytes | None = None
    _symlinks: set[bytes] = field(default_factory=set)
    _files: set[bytes] = field(default_factory=set)
    _ended: bool = False

    def feed(self, data: bytes | memoryview) -> bytes:
        out: list[bytes | memoryview] = []
        view = memoryview(data)
        while view and not self._ended:
            if self._copy:
                n = min(self._copy, len(view))
                out.append(view[:n])
                self._copy -= n
                view = view[n:]
            elif self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
            elif self._meta_left:
                n = min(self._meta_left, len(view))
                self._meta += view[:n]
                self._meta_left -= n
                view = view[n:]
                if not self._meta_left:
                    self._end_meta()
            else:
                need = BLOCK - len(self._buf)
                self._buf += view[:need]
                view = view[need:]
                if len(self._buf) == BLOCK:
                    header = bytes(self._buf)
                    self._buf.clear()
                    emitted = self._header(header)
                    if emitted:
                        out.append(emitted)
        return b"".join(out)

    def finish(self) -> bytes:
        if not self._ended:
            raise MalformedArchive("the tar stream ends without its end-of-archive marker")
        return bytes(2 * BLOCK)

    # --- one header ----------------------------------------------------------------------

    def _header(self, header: bytes) -> bytes:
        if header == bytes(BLOCK):
            self._ended = True  # GNU tar stops at the first zero block too
            return b""
        stored = _number(header[148:156], "chksum")
        if stored != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            raise MalformedArchive("tar header checksum mismatch")
        kind = header[156:157]
        size = _number(header[124:136], "size")
        if size < 0:
            raise MalformedArchive("negative size in a tar header")
        padded = -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L", b"K"):
            if size > MAX_META:
                raise MalformedArchive(f"tar metadata entry of {size} bytes")
            self._meta_kind, self._meta_left = kind, padded
            self._meta = bytearray()
            self._meta_size = size
            if not padded:
                self._end_meta()
            return b""
        pax = dict(self._pax)
        name, link = self._names(header, pax)
        self._pax, self._long_name, self._long_link = [], None, None
        if b"size" in pax:
            size = _pax_size(pax[b"size"])
            padded = -(-size // BLOCK) * BLOCK
        reason = self._refuse(kind, name, link, pax)
        data_len = size if kind in _REGULAR else 0
        if reason is None and kind in _REGULAR and self.size_limit is not None \
                and self.real_bytes + size > self.size_limit:
            raise HomeTooLarge(
                f"the archive's files add up to more than the home size limit of "
                f"{self.size_limit} bytes (at {name.decode(errors='replace')!r})")
        if reason is not None:
            self.dropped.append((name.decode(errors="replace"), reason))
            self._skip = padded
            return b""
        self._copy = padded if data_len else 0
        self._skip = 0 if data_len else padded
        clean = _clean(name, self.top)
        assert clean is not None
        if kind in _REGULAR:
            self.real_bytes += size
            self._files.add(clean)
        if kind == b"2":
            self._symlinks.add(clean)
        else:
            self._symlinks.discard(clean)
        return self._emit(header, kind, name, link, pax)

    def _names(self, header: bytes, pax: dict[bytes, bytes]) -> tuple[bytes, bytes]:
        """The member's path and link target: GNU long names, else PAX, else the header."""
        name = self._long_name if self._long_name is not None else pax.get(b"path")
        if name is None:
            name = header[0:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        link = self._long_link if self._long_link is not None else pax.get(b"linkpath")
        if link is None:
            link = header[157:257].split(b"\0", 1)[0]
        return name, link

    def _refuse(self, kind: bytes, name: bytes, link: bytes,
                pax: dict[bytes, bytes]) -> str | None:
        if kind not in _KEPT:
            return {b"3": "character device", b"4": "block device"}.get(
                kind, f"entry type {kind!r}")
        if any(key.startswith(b"GNU.sparse.") for key in pax):
            return "sparse entry"
        clean = _clean(name, self.top)
        if clean is None:
            return "outside the home"
        parts = clean.split(b"/")
        for i in range(1, len(parts) + (kind == b"5")):
            if b"/".join(parts[:i]) in self._symlinks:
                return "through a symlink"
        if kind == b"1":
            target = _clean(link, self.top)
            if target is None or target not in self._files:
                return "hard link to a file outside the home"
        return None

    def _emit(self, header: bytes, kind: bytes, name: bytes, link: bytes,
              pax: dict[bytes, bytes]) -> bytes:
        out = bytearray(header)
        mode = _number(header[100:108], "mode") & 0o1777  # no setuid, no setgid
        out[100:108] = _octal(mode, 8)
        out[108:116] = _octal(self.uid, 8)
        out[116:124] = _octal(self.gid, 8)
        out[265:329] = bytes(64)  # uname, gname
        if kind not in _REGULAR:  # whatever a crafted header claims, no data follows
            out[124:136] = _octal(0, 12)
            pax.pop(b"size", None)
        records = [(k, v) for k, v in pax.items() if k not in _DROPPED_PAX
                   and (not k.startswith(b"SCHILY.xattr.")
                        or k.startswith(b"SCHILY.xattr.user."))
                   and not k.startswith(b"LIBARCHIVE.xattr.")]
        long_name = len(name) > 100 or header[0:100].split(b"\0", 1)[0] != name
        if long_name:
            records.append((b"path", name))
            out[0:100] = name[:100].ljust(100, b"\0")
            out[345:500] = bytes(155)
        if kind in (b"1", b"2") and (len(link) > 100
                                     or header[157:257].split(b"\0", 1)[0] != link):
            records.append((b"linkpath", link))
            out[157:257] = link[:100].ljust(100, b"\0")
        out[148:156] = b" " * 8
        out[148:156] = b"%06o\0 " % sum(out)
        if not records:
            return bytes(out)
        body = b"".join(_pax_entry(k, v) for k, v in records)
        pax_header = bytearray(BLOCK)
        pax_header[0:100] = b"././@PaxHeader".ljust(100, b"\0")
        pax_header[100:108] = _octal(0o644, 8)
        pax_header[108:116] = _octal(0, 8)
        pax_header[116:124] = _octal(0, 8)
        pax_header[124:136] = _octal(len(body), 12)
        pax_header[136:148] = _octal(0, 12)
        pax_header[156:157] = b"x"
        pax_header[257:265] = b"ustar\x0000"
        pax_header[148:156] = b" " * 8
        pax_header[148:156] = b"%06o\0 " % sum(pax_header)
        padding = bytes(-len(body) % BLOCK)
        return bytes(pax_header) + body + padding + bytes(out)

    def _end_meta(self) -> None:
        data = bytes(self._meta[:self._meta_size])
        kind, self._meta_kind = self._meta_kind, b""
        if kind == b"x":
            self._pax = _pax_records(data)
        elif kind == b"L":
            self._long_name = data.split(b"\0", 1)[0]
        elif kind == b"K":
            self._long_link = data.split(b"\0", 1)[0]
        # b"g": global PAX headers are dropped whole.
