"""Layer snapshots: overlay-format directories <-> OCI layer tars.

Layers are kept unpacked in overlayfs format so they stack directly as overlay
lower dirs, and a RUN's upper dir *is* its diff: a deletion is a char device 0:0,
a directory replacing a lower one carries ``trusted.overlay.opaque=y``. This
module turns such a dir into a deterministic OCI layer tar and back, unpacks
`ADD` archives into plain directories, and flattens a stack into one rootfs tar.

Everything streams: file data moves in 1 MiB chunks through hashlib, so digests
come for free while writing or reading and no layer is read twice.
"""
from __future__ import annotations

import base64
import bz2
import errno
import gzip
import hashlib
import lzma
import os
import shutil
import stat
import urllib.parse
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

import tarsafe
import zstandard

from grammar.errors import PybuildError

T = TypeVar("T")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
# Overlay bookkeeping (origin, impure, redirect, ...) is host-specific; opacity is
# carried by the .wh..wh..opq marker instead. SELinux labels belong to the host.
_SKIPPED_XATTR_PREFIXES = ("trusted.overlay.", "security.selinux")

_CHUNK = 1 << 20
_NS = 1_000_000_000
_MAX_NS = (1 << 63) - 1
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_WH = WHITEOUT_PREFIX.encode()
_OPQ = OPAQUE_MARKER.encode()


@dataclass(frozen=True)
class LayerInfo:
    """What a layer tar is known by: diff_id and size of the *uncompressed* tar."""

    diff_id: str
    size: int


@dataclass(frozen=True)
class EntryInfo:
    """One path of a merged filesystem, as tests and `merged_tree` compare them."""

    kind: str  # file, dir, symlink, char, block, fifo
    mode: int  # permission bits including setuid/setgid/sticky
    uid: int
    gid: int
    mtime: int  # seconds
    size: int = 0
    target: str = ""  # symlink target
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    digest: str = ""  # sha256 of a regular file's content


# --------------------------------------------------------------------------- walking


_PLAIN, _WHITEOUT, _OPAQUE = 0, 1, 2


@dataclass(slots=True)
class _Node:
    """One tar entry to write: its tar path (no slashes at either end) and its source."""

    name: bytes
    path: bytes
    st: os.stat_result
    kind: int = _PLAIN
    xattrs: list[tuple[str, bytes]] = field(default_factory=list)
    chain: list[bytes] | None = None  # merged view: the layer dirs forming this dir, top first


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: bytes) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError as e:
        if e.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise


def _read_xattrs(path: bytes) -> tuple[list[tuple[str, bytes]], bool]:
    """The xattrs worth archiving, sorted, and whether the dir is overlay-opaque."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return [], False
        raise
    if not names:
        return [], False
    kept: list[tuple[str, bytes]] = []
    opaque = False
    for key in names:
        try:
            value = os.getxattr(path, key, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.ENODATA:
                continue
            raise
        if key == OPAQUE_XATTR:
            opaque = value == b"y"
        elif not key.startswith(_SKIPPED_XATTR_PREFIXES):
            kept.append((key, value))
    kept.sort()
    return kept, opaque


def _join(rel: bytes, name: bytes) -> bytes:
    return rel + b"/" + name if rel else name


def _layer_children(dirpath: bytes, rel: bytes) -> list[_Node]:
    kids = []
    with os.scandir(dirpath) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            if _is_whiteout(st):
                kids.append(_Node(_join(rel, _WH + e.name), e.path, st, _WHITEOUT))
            elif e.name.startswith(_WH):
                shown = os.fsdecode(_join(rel, e.name))
                raise PybuildError(f"/{shown}: names starting with {WHITEOUT_PREFIX} are reserved for layer whiteouts")
            else:
                kids.append(_Node(_join(rel, e.name), e.path, st))
    kids.sort(key=attrgetter("name"))
    return kids


def _layer_nodes(root: bytes) -> Iterator[_Node]:
    """An overlay-format dir depth-first, each dir's children sorted by tar name bytes.

    The order of GNU tar --sort=name and Go's WalkDir. An opaque dir's marker comes
    right after the dir, before its contents, as moby writes it: appliers that
    clear the dir on seeing the marker then keep this layer's own entries.
    """
    stack = [iter(_layer_children(root, b""))]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            continue
        if node.kind == _WHITEOUT:
            yield node
            continue
        node.xattrs, opaque = _read_xattrs(node.path)
        yield node
        if stat.S_ISDIR(node.st.st_mode):
            if opaque:
                yield _Node(node.name + b"/" + _OPQ, node.path, node.st, _OPAQUE)
            stack.append(iter(_layer_children(node.path, node.name)))


def _dir_chain(top: bytes, lowers: list[bytes]) -> list[bytes]:
    """The dirs overlayfs merges under `top`: lower dirs down to an opaque one, a whiteout or a non-dir."""
    chain = [top]
    if _is_opaque(top):
        return chain
    for path in lowers:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(st.st_mode):
            break
        chain.append(path)
        if _is_opaque(path):
            break
    return chain


def _merged_children(chain: list[bytes], rel: bytes) -> list[_Node]:
    found: dict[bytes, _Node | None] = {}
    for level, src in enumerate(chain):
        with os.scandir(src) as it:
            for e in it:
                if e.name in found:
                    continue
                st = e.stat(follow_symlinks=False)
                if _is_whiteout(st):
                    found[e.name] = None
                    continue
                node = _Node(_join(rel, e.name), e.path, st)
                if stat.S_ISDIR(st.st_mode):
                    node.chain = _dir_chain(e.path, [d + b"/" + e.name for d in chain[level + 1:]])
                found[e.name] = node
    return sorted((n for n in found.values() if n is not None), key=attrgetter("name"))


def _merged_nodes(layer_dirs: list[Path]) -> Iterator[_Node]:
    """The overlay view of a layer stack (bottom first), in the same order as `_layer_nodes`."""
    roots = [os.fsencode(d) for d in reversed(layer_dirs)]
    if not roots:
        return
    stack = [iter(_merged_children(_dir_chain(roots[0], roots[1:]), b""))]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            continue
        node.xattrs, _ = _read_xattrs(node.path)
        yield node
        if node.chain is not None:
            stack.append(iter(_merged_children(node.chain, node.name)))


# --------------------------------------------------------------------------- tar writing


class _DigestWriter:
    """Writes through to `out`, hashing and counting as the bytes pass."""

    __slots__ = ("_out", "_hash", "size")

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self._hash.update(data)
        view = memoryview(data)
        self.size += len(view)
        while view:
            n = self._out.write(view)
            if n is None or n >= len(view):  # buffered writers take everything
                break
            view = view[n:]

    def info(self) -> LayerInfo:
        return LayerInfo("sha256:" + self._hash.hexdigest(), self.size)


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" %s=%s\n" % (key, value)
    digits = 1
    while len(str(len(body) + digits)) > digits:
        digits += 1
    return b"%d%s" % (len(body) + digits, body)


def _split_ustar(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for ustar's 155+100 byte fields, as Go's archive/tar splits."""
    if len(name) <= 100:
        return b"", name
    end = min(len(name), 156)
    if end == len(name) and name.endswith(b"/"):
        end -= 1
    i = name.rfind(b"/", 0, end)
    if i <= 0 or not 0 < len(name) - i - 1 <= 100:
        return None
    return name[:i], name[i + 1:]


def _tar_header(
    name: bytes,
    typeflag: bytes,
    mode: int,
    uid: int,
    gid: int,
    mtime: int,
    *,
    size: int = 0,
    linkname: bytes = b"",
    dev: tuple[int, int] = (0, 0),
    xattrs: list[tuple[str, bytes]] | None = None,
) -> bytes:
    """A ustar header, preceded by a PAX header only when ustar cannot say it all."""
    pax: dict[bytes, bytes] = {}
    split = _split_ustar(name) if name.isascii() else None
    if split is None:
        pax[b"path"] = name
        split = (b"", name[:100])
    prefix, short = split
    if len(linkname) > 100 or not linkname.isascii():
        pax[b"linkpath"] = linkname
        linkname = linkname[:100]
    if not (0 <= uid < _MAX_ID and 0 <= gid < _MAX_ID and 0 <= size < _MAX_BIG and 0 <= mtime < _MAX_BIG):
        for key, value, limit in ((b"uid", uid, _MAX_ID), (b"gid", gid, _MAX_ID),
                                  (b"size", size, _MAX_BIG), (b"mtime", mtime, _MAX_BIG)):
            if not 0 <= value < limit:
                pax[key] = b"%d" % value
        uid, gid, size, mtime = (v if 0 <= v < lim else 0 for v, lim in
                                 ((uid, _MAX_ID), (gid, _MAX_ID), (size, _MAX_BIG), (mtime, _MAX_BIG)))
    for key, value in xattrs or ():
        pax[b"SCHILY.xattr." + key.encode("utf-8", "surrogateescape")] = value
    block = _ustar_block(short, prefix, typeflag, mode, uid, gid, size, mtime, linkname, dev)
    if not pax:
        return block
    records = b"".join(_pax_record(k, pax[k]) for k in sorted(pax))
    head = _ustar_block(b"././@PaxHeader", b"", b"x", 0o644, 0, 0, len(records), 0, b"", (0, 0))
    return head + records + bytes(-len(records) % 512) + block


_MAX_ID = 8 ** 7  # what 8-byte octal fields hold
_MAX_BIG = 8 ** 11  # what 12-byte octal fields hold
_USTAR_FIXED_SUM = sum(b" " * 8 + b"ustar\x0000")  # the checksum field counts as spaces
_ZEROS_64 = bytes(64)
_ZEROS_12 = bytes(12)


def _ustar_block(name: bytes, prefix: bytes, typeflag: bytes, mode: int, uid: int, gid: int, size: int,
                 mtime: int, linkname: bytes, dev: tuple[int, int]) -> bytes:
    numbers = b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode, uid, gid, size, mtime)
    devs = b"%07o\0%07o\0" % dev
    # NUL padding adds nothing to the checksum: sum the short fields only
    chksum = _USTAR_FIXED_SUM + sum(name) + sum(numbers) + typeflag[0] + sum(linkname) + sum(devs) + sum(prefix)
    return b"".join((
        name.ljust(100, b"\0"), numbers, b"%06o\0 " % chksum, typeflag, linkname.ljust(100, b"\0"),
        b"ustar\x0000", _ZEROS_64, devs, prefix.ljust(155, b"\0"), _ZEROS_12,
    ))


class _TarWriter:
    """Deterministic tar output: numeric ids, no atime/ctime, hard links by inode."""

    def __init__(self, out: BinaryIO, clamp_mtime: int | None) -> None:
        self._w = _DigestWriter(out)
        self._clamp = clamp_mtime
        self._links: dict[tuple[int, int], bytes] = {}
        self._buf = bytearray(_CHUNK)

    def add(self, node: _Node) -> None:
        st = node.st
        mtime = st.st_mtime_ns // _NS
        if self._clamp is not None and mtime > self._clamp:
            mtime = self._clamp
        mode, perm, uid, gid = st.st_mode, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        write = self._w.write
        if node.kind == _WHITEOUT:  # as moby's overlay converter writes them
            write(_tar_header(node.name, b"0", 0o600, uid, gid, mtime))
        elif node.kind == _OPAQUE:
            write(_tar_header(node.name, b"0", perm & 0o777, uid, gid, mtime))
        elif stat.S_ISDIR(mode):
            write(_tar_header(node.name + b"/", b"5", perm, uid, gid, mtime, xattrs=node.xattrs))
        elif stat.S_ISSOCK(mode):
            return  # sockets cannot be archived; docker skips them too
        elif st.st_nlink > 1 and (st.st_dev, st.st_ino) in self._links:
            write(_tar_header(node.name, b"1", perm, uid, gid, mtime, linkname=self._links[st.st_dev, st.st_ino]))
        else:
            if st.st_nlink > 1:
                self._links[st.st_dev, st.st_ino] = node.name
            if stat.S_ISREG(mode):
                header = _tar_header(node.name, b"0", perm, uid, gid, mtime, size=st.st_size, xattrs=node.xattrs)
                self._file(header, node.path, st.st_size)
            elif stat.S_ISLNK(mode):
                target = os.readlink(node.path)
                write(_tar_header(node.name, b"2", perm, uid, gid, mtime, linkname=target, xattrs=node.xattrs))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                flag = b"3" if stat.S_ISCHR(mode) else b"4"
                dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                write(_tar_header(node.name, flag, perm, uid, gid, mtime, dev=dev, xattrs=node.xattrs))
            elif stat.S_ISFIFO(mode):
                write(_tar_header(node.name, b"6", perm, uid, gid, mtime, xattrs=node.xattrs))

    def _file(self, header: bytes, path: bytes, size: int) -> None:
        """Header, data and padding; a small file goes out in one write with its header."""
        view = memoryview(self._buf)
        padded = size + -size % 512
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            if len(header) + padded <= _CHUNK:
                start = pos = len(header)
                view[:start] = header
                end = start + size
                while pos < end:
                    n = os.readv(fd, [view[pos:end]])
                    if n == 0:
                        raise PybuildError(f"{os.fsdecode(path)}: file shrank while being archived")
                    pos += n
                view[end:start + padded] = bytes(padded - size)
                self._w.write(view[:start + padded])
                return
            self._w.write(header)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            left = size
            while left:
                n = os.readv(fd, [view[:min(left, _CHUNK)]])
                if n == 0:
                    raise PybuildError(f"{os.fsdecode(path)}: file shrank while being archived")
                self._w.write(view[:n])
                left -= n
        finally:
            os.close(fd)
        if size % 512:
            self._w.write(bytes(512 - size % 512))

    def close(self) -> LayerInfo:
        self._w.write(bytes(1024))
        return self._w.info()


def write_layer_tar(layer_dir: Path, out: BinaryIO, *, clamp_mtime: int | None = None) -> LayerInfo:
    """Write the OCI layer tar of an overlay-format dir to `out`; digest it on the way.

    Whiteout devices become empty `.wh.<name>` files, opaque dirs get a
    `.wh..wh..opq` entry; `clamp_mtime` (SOURCE_DATE_EPOCH) caps every mtime.
    """
    writer = _TarWriter(out, clamp_mtime)
    for node in _layer_nodes(os.fsencode(layer_dir)):
        writer.add(node)
    return writer.close()


def export_rootfs(layer_dirs: list[Path], out: BinaryIO, *, clamp_mtime: int | None = None) -> LayerInfo:
    """Flatten overlay-format layers (bottom first) into one plain rootfs tar."""
    writer = _TarWriter(out, clamp_mtime)
    for node in _merged_nodes(layer_dirs):
        writer.add(node)
    return writer.close()


def merged_tree(layer_dirs: list[Path]) -> dict[str, EntryInfo]:
    """The merged view of a layer stack, path -> metadata (reads every file: for tests and checks)."""
    tree: dict[str, EntryInfo] = {}
    for node in _merged_nodes(layer_dirs):
        st = node.st
        mode = st.st_mode
        common = dict(mode=stat.S_IMODE(mode), uid=st.st_uid, gid=st.st_gid,
                      mtime=st.st_mtime_ns // _NS, xattrs=tuple(node.xattrs))
        if stat.S_ISREG(mode):
            with open(node.path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            entry = EntryInfo("file", size=st.st_size, digest=digest, **common)
        elif stat.S_ISDIR(mode):
            entry = EntryInfo("dir", **common)
        elif stat.S_ISLNK(mode):
            entry = EntryInfo("symlink", target=os.fsdecode(os.readlink(node.path)), **common)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = "char" if stat.S_ISCHR(mode) else "block"
            entry = EntryInfo(kind, rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), **common)
        elif stat.S_ISFIFO(mode):
            entry = EntryInfo("fifo", **common)
        else:
            continue
        tree[os.fsdecode(node.name)] = entry
    return tree


# --------------------------------------------------------------------------- compression


def _compression(head: bytes) -> str | None:
    """The compression of a stream by its magic bytes, as moby's DecompressStream tells them."""
    if head.startswith(b"\x1f\x8b\x08"):
        return "gzip"
    if head.startswith(b"BZh"):
        return "bzip2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") & 0xFFFFFFF0 == 0x184D2A50:
        return "zstd"  # a zstd skippable frame
    return None


class _Prefixed:
    """A reader that gives back the peeked magic bytes before the rest of the stream."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = head
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        if self._head:
            if n is None or n < 0:
                data, self._head = self._head + self._rest.read(), b""
                return data
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._rest.read(n)


def _read_full(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = stream.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def decompress(stream: BinaryIO) -> tuple[BinaryIO, str | None]:
    """(a reader of the uncompressed bytes, the compression found: gzip/bzip2/xz/zstd or None)."""
    head = _read_full(stream, 6)
    src = _Prefixed(head, stream)
    kind = _compression(head)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=src, mode="rb"), kind  # type: ignore[arg-type]
    if kind == "bzip2":
        return bz2.BZ2File(src), kind  # type: ignore[arg-type]
    if kind == "xz":
        return lzma.LZMAFile(src), kind  # type: ignore[arg-type]
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True)  # type: ignore[arg-type]
        return reader, kind  # type: ignore[return-value]
    return src, None  # type: ignore[return-value]


_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, zstandard.ZstdError)


class _DigestReader:
    """The uncompressed tar stream, hashed as the tar reader pulls it through."""

    def __init__(self, stream: BinaryIO) -> None:
        self._raw, self._kind = decompress(stream)
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._raw.read(n)
        except _DECOMPRESS_ERRORS as e:
            if self._kind is None:
                raise
            raise PybuildError(f"corrupt {self._kind} archive: {e}") from None
        self._hash.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Hash what the tar reader left unread (end blocks, padding) so the digest covers the whole tar."""
        while self.read(_CHUNK):
            pass

    def info(self) -> LayerInfo:
        return LayerInfo("sha256:" + self._hash.hexdigest(), self.size)


def _parse_number(raw: bytes) -> int | None:
    """A tar numeric field: octal text, or GNU base-256 when the high bit is set; None if garbage."""
    if raw[:1] and raw[0] & 0x80:
        if raw[0] == 0xFF:
            return int.from_bytes(raw, "big", signed=True)
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.strip(b" \0")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _checksum_ok(block: bytes) -> bool:
    """Whether the header checksum matches, counted unsigned or (as old tars did) signed."""
    stored = _parse_number(block[148:156])
    blank = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(blank)
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for c in blank if c > 127)


def is_archive(path: Path) -> bool:
    """Whether ADD would unpack this file: a (gzip/bzip2/xz/zstd-compressed) tar.

    Like BuildKit's isArchivePath: a regular file whose decompressed start is a
    tar header with a valid checksum. Anything else, e.g. a .tar.gz that holds
    no tar, is copied as a file.
    """
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            block = _read_full(decompress(f)[0], 512)
    except (*_DECOMPRESS_ERRORS, ValueError):
        return False
    if len(block) < 512 or block == bytes(512):
        return False  # an empty archive reads as end-of-archive, not a header
    size = _parse_number(block[124:136])
    return _checksum_ok(block) and size is not None and size >= 0


# --------------------------------------------------------------------------- tar reading


_ZERO_BLOCK = bytes(512)
_MAX_META = 16 << 20  # PAX and GNU long-name data is held in memory: cap what a hostile tar may ask
_KINDS = {b"0": "reg", b"\0": "reg", b"7": "reg", b"1": "lnk", b"2": "sym", b"3": "chr", b"4": "blk",
          b"5": "dir", b"6": "fifo"}
_HEADER_ONLY = {"lnk", "sym", "chr", "blk", "dir", "fifo"}  # data size is ignored, as Go's reader does


@dataclass(slots=True)
class _Member:
    """One tar entry with PAX and GNU long-name headers folded in."""

    name: str
    kind: str  # reg, lnk, sym, chr, blk, dir, fifo
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    linkname: str
    dev: tuple[int, int]
    xattrs: list[tuple[str, bytes]]


def _cstr(raw: bytes) -> bytes:
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def _pax_records(data: bytes) -> dict[str, bytes]:
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        record = data[space + 1:pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n") or b"=" not in record:
            raise PybuildError("broken tar archive: bad PAX record")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return records


def _pax_time_ns(text: bytes) -> int:
    sign = -1 if text.startswith(b"-") else 1
    whole, _, frac = text.lstrip(b"-").partition(b".")
    try:
        return sign * (int(whole or b"0") * _NS + int((frac[:9] or b"0").ljust(9, b"0")))
    except ValueError:
        raise PybuildError(f"broken tar archive: bad PAX mtime {text!r}") from None


def _pax_xattrs(pax: dict[str, bytes]) -> list[tuple[str, bytes]]:
    """SCHILY.xattr.* (GNU tar, Go) and LIBARCHIVE.xattr.* (bsdtar) records, minus overlay/host ones."""
    found: dict[str, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            found[key[13:]] = value
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[17:], errors="surrogateescape")
            found.setdefault(name, base64.b64decode(value + b"=" * (-len(value) % 4)))
    return sorted((k, v) for k, v in found.items() if not k.startswith(_SKIPPED_XATTR_PREFIXES))


class _TarReader:
    """A streaming tar parser: ustar, GNU and PAX headers, data copied straight to fds.

    tarfile costs ~50 us of Python per header; this one a fraction of that, and it
    fails loudly on a corrupt header where tarfile's stream mode quietly stops.
    """

    def __init__(self, src: _DigestReader) -> None:
        self._src = src
        self._buf = b""
        self._pos = 0
        self._left = 0  # unread data of the current entry
        self._pad = 0

    def _fill(self, n: int) -> bool:
        while len(self._buf) - self._pos < n:
            data = self._src.read(max(_CHUNK, n))
            if not data:
                return False
            self._buf = self._buf[self._pos:] + data
            self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        if not self._fill(n):
            raise PybuildError("broken tar archive: unexpected end of data")
        data = self._buf[self._pos:self._pos + n]
        self._pos += n
        return data

    def _block(self) -> bytes | None:
        if not self._fill(512):
            if len(self._buf) > self._pos:
                raise PybuildError("broken tar archive: unexpected end of data")
            return None  # EOF on a header boundary ends the archive, as Go's reader takes it
        return self._take(512)

    def _skip(self, n: int) -> None:
        while n:
            have = len(self._buf) - self._pos
            if have:
                step = min(have, n)
                self._pos += step
                n -= step
            elif not self._fill(1):
                raise PybuildError("broken tar archive: unexpected end of data")

    def copy_to(self, fd: int, n: int) -> None:
        """Write the next `n` data bytes of the current entry to `fd`."""
        if n > self._left:
            raise ValueError("reading past the entry")
        self._left -= n
        while n:
            have = len(self._buf) - self._pos
            if not have:
                data = self._src.read(min(n, _CHUNK))  # big files bypass the buffer
                if not data:
                    raise PybuildError("broken tar archive: unexpected end of data")
                view, self._buf, self._pos = memoryview(data), b"", 0
            else:
                step = min(have, n)
                view = memoryview(self._buf)[self._pos:self._pos + step]
                self._pos += step
            n -= len(view)
            while view:
                view = view[os.write(fd, view):]

    def members(self) -> Iterator[_Member]:
        pax: dict[str, bytes] = {}
        longname = longlink = None
        while True:
            if self._left or self._pad:
                self._skip(self._left + self._pad)
                self._left = self._pad = 0
            block = self._block()
            if block is None:
                return
            if block == _ZERO_BLOCK:
                after = self._block()
                if after is not None and after != _ZERO_BLOCK:
                    raise PybuildError("broken tar archive: a lone zero block in the middle")
                return
            if not _checksum_ok(block):
                raise PybuildError(f"broken tar archive: bad header checksum (after {self._src.size} bytes)")
            flag = block[156:157]
            size = _parse_number(block[124:136])
            if size is None or size < 0:
                raise PybuildError("broken tar archive: bad size field")
            if flag in (b"x", b"g", b"L", b"K"):
                if size > _MAX_META:
                    raise PybuildError(f"broken tar archive: {size}-byte {flag.decode()} header")
                data = self._take(size)
                self._skip(-size % 512)
                if flag == b"x":
                    pax.update(_pax_records(data))
                elif flag == b"L":
                    longname = _cstr(data)
                elif flag == b"K":
                    longlink = _cstr(data)
                continue  # global headers ('g') are ignored, as moby and BuildKit do
            yield self._member(block, flag, size, pax, longname, longlink)
            pax, longname, longlink = {}, None, None

    def _member(self, block: bytes, flag: bytes, size: int, pax: dict[str, bytes],
                longname: bytes | None, longlink: bytes | None) -> _Member:
        name = _cstr(block[0:100])
        if block[257:263] == b"ustar\0" and block[345] != 0:  # POSIX prefix; GNU keeps other fields there
            name = _cstr(block[345:500]) + b"/" + name
        name = pax.get("path", longname if longname is not None else name)
        link = pax.get("linkpath", longlink if longlink is not None else _cstr(block[157:257]))
        shown = os.fsdecode(name)
        kind = _KINDS.get(flag)
        if kind is None or any(k.startswith("GNU.sparse.") for k in pax):
            what = "sparse file" if flag == b"S" or kind is not None else f"entry type {flag!r}"
            raise PybuildError(f"archive entry {shown!r}: unsupported {what}")
        if kind == "reg" and flag != b"7" and name.endswith(b"/"):
            kind = "dir"  # pre-POSIX archives mark directories with a trailing slash
        numbers = [_parse_number(block[a:b]) for a, b in ((100, 108), (108, 116), (116, 124), (136, 148),
                                                           (329, 337), (337, 345))]
        if any(n is None for n in numbers):
            raise PybuildError(f"archive entry {shown!r}: bad numeric header field")
        mode, uid, gid, mtime, major, minor = numbers
        try:
            uid = int(pax["uid"]) if "uid" in pax else uid
            gid = int(pax["gid"]) if "gid" in pax else gid
            size = int(pax["size"]) if "size" in pax else size
        except ValueError:
            raise PybuildError(f"archive entry {shown!r}: bad PAX number") from None
        mtime_ns = _pax_time_ns(pax["mtime"]) if "mtime" in pax else mtime * _NS
        if size < 0:
            raise PybuildError(f"archive entry {shown!r}: negative size")
        if kind in _HEADER_ONLY:
            size = 0
        self._left, self._pad = size, -size % 512
        return _Member(
            name=shown.rstrip("/") if kind == "dir" else shown,
            kind=kind, mode=mode & 0o7777, uid=uid, gid=gid, size=size,
            mtime_ns=mtime_ns if 0 <= mtime_ns <= _MAX_NS else 0,  # out of range: the epoch, as moby bounds it
            linkname=os.fsdecode(link), dev=(major, minor), xattrs=_pax_xattrs(pax))


# --------------------------------------------------------------------------- extraction


def _lexical(base: tuple[str, ...], rel: str) -> tuple[str, ...] | None:
    """`rel` resolved against `base` without touching the disk; None if it climbs above the root."""
    out = list(base)
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return None
            out.pop()
        else:
            out.append(part)
    return tuple(out)


def _tarsafe_escapes(root: str, name: str) -> bool:
    """tarsafe's own traversal test (its cheap filter, then path containment)."""
    checker = tarsafe.TarSafe
    if not checker._looks_suspicious(name):
        return False
    return not checker._is_contained(root, os.path.abspath(os.path.join(root, name)))


class _Extractor:
    """Writes tar entries under one root through directory fds, never following a symlink.

    Every parent is opened with O_NOFOLLOW from the root down, so neither a
    symlink the archive made nor one already in the destination can redirect a
    write. In `chroot` mode (ADD) parent symlinks are resolved by hand inside the
    root, as BuildKit does; otherwise (layers) an entry below a symlink is refused.
    """

    _MAX_FDS = 64

    def __init__(self, dest: Path, *, overlay: bool, chroot: bool, chown: tuple[int, int] | None) -> None:
        self.overlay = overlay
        self.chroot = chroot
        self.chown = chown
        self.root = os.path.realpath(dest)
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fds: OrderedDict[tuple[str, ...], int] = OrderedDict()
        self.dir_times: dict[tuple[str, ...], int] = {}
        self.extracted: set[tuple[str, ...]] = set()
        self.names: list[str] = []
        self.is_root = os.geteuid() == 0

    def close(self) -> None:
        self._forget_fds()
        os.close(self.root_fd)

    # ---- directory fds

    def _forget_fds(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def _dirfd(self, parts: tuple[str, ...], entry: str, *, create: bool) -> int:
        """An fd for the dir at `parts` below the root, opened component by component without following symlinks."""
        if not parts:
            return self.root_fd
        fd = self.fds.get(parts)
        if fd is not None:
            self.fds.move_to_end(parts)
            return fd
        start = len(parts) - 1
        while start > 0 and parts[:start] not in self.fds:
            start -= 1
        cur = self.fds[parts[:start]] if start else self.root_fd
        owned = False  # whether `cur` was opened by this walk and must be closed on the way
        try:
            for i in range(start, len(parts)):
                nxt = self._open_child(cur, parts, i, entry, create)
                if owned:
                    os.close(cur)
                cur, owned = nxt, True
        except BaseException:
            if owned:
                os.close(cur)
            raise
        self.fds[parts] = cur
        if len(self.fds) > self._MAX_FDS:
            os.close(self.fds.popitem(last=False)[1])
        return cur

    @staticmethod
    def _open_child(cur: int, parts: tuple[str, ...], i: int, entry: str, create: bool) -> int:
        try:
            return os.open(parts[i], _OPEN_DIR, dir_fd=cur)
        except FileNotFoundError:
            if not create:
                raise PybuildError(f"archive entry {entry!r}: /{'/'.join(parts[:i + 1])} does not exist") from None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise PybuildError(
                    f"archive entry {entry!r}: /{'/'.join(parts[:i + 1])} is a symlink or not a directory; "
                    "refusing to write through it") from None
            raise
        os.mkdir(parts[i], 0o755, dir_fd=cur)  # an implied parent, made as docker makes them
        fd = os.open(parts[i], _OPEN_DIR, dir_fd=cur)
        os.fchmod(fd, 0o755)
        return fd

    def _resolve(self, parts: tuple[str, ...], entry: str, *, follow_leaf: bool) -> tuple[str, ...]:
        """`parts` with symlinks resolved inside the root, chroot-style (ADD only)."""
        for _ in range(255):
            resolved: list[str] = []
            cur = self.root_fd
            for i, part in enumerate(parts):
                if i == len(parts) - 1 and not follow_leaf:
                    return (*resolved, part)
                try:
                    st = os.stat(part, dir_fd=cur, follow_symlinks=False)
                except FileNotFoundError:
                    return (*resolved, *parts[i:])
                if stat.S_ISLNK(st.st_mode):
                    target = os.fsdecode(os.readlink(part, dir_fd=cur))
                    new = _lexical(() if target.startswith("/") else tuple(resolved), target)
                    if new is None:
                        link = "/".join((*resolved, part))
                        raise PybuildError(f"archive entry {entry!r}: symlink /{link} points outside the destination")
                    parts = (*new, *parts[i + 1:])
                    break
                resolved.append(part)
                if i < len(parts) - 1:
                    if not stat.S_ISDIR(st.st_mode):
                        raise PybuildError(f"archive entry {entry!r}: /{'/'.join(resolved)} is not a directory")
                    cur = self._dirfd(tuple(resolved), entry, create=False)
            else:
                return tuple(resolved)
        raise PybuildError(f"archive entry {entry!r}: too many levels of symlinks")

    # ---- entries

    def _clean(self, raw: str, what: str = "") -> tuple[str, ...]:
        if self.chroot:  # docker rebases absolute names under the destination
            parts = _lexical((), raw)
            if parts is None:
                raise PybuildError(f"archive entry {raw!r}{what} is outside the destination")
            return parts
        if raw.startswith("/"):
            raise PybuildError(f"layer entry {raw!r}{what} is an absolute path")
        parts = tuple(p for p in raw.split("/") if p not in ("", "."))
        if ".." in parts:
            raise PybuildError(f"layer entry {raw!r}{what} has a '..' component")
        return parts

    def _remove(self, name: str, pfd: int) -> os.stat_result | None:
        """Clear the way for a new entry; later entries override earlier ones."""
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if stat.S_ISDIR(st.st_mode):
            self._forget_fds()  # cached fds may point into the removed tree
            shutil.rmtree(name, dir_fd=pfd)
        else:
            os.unlink(name, dir_fd=pfd)
        return st

    def run(self, reader: _DigestReader) -> None:
        tar = _TarReader(reader)
        for m in tar.members():
            try:
                self._entry(tar, m)
            except OSError as e:
                raise PybuildError(f"cannot extract {m.name!r}: {e.strerror or e}") from None
        self._restore_dir_times()

    def _entry(self, tar: _TarReader, m: _Member) -> None:
        raw = m.name
        if not self.chroot:  # tarsafe's containment checks, on top of the stricter ones below
            if _tarsafe_escapes(self.root, raw):
                raise PybuildError(f"layer entry {raw!r} escapes the layer")
            if m.kind == "lnk" and _tarsafe_escapes(self.root, m.linkname):
                raise PybuildError(f"layer entry {raw!r} hard-links outside the layer")
        parts = self._clean(raw)
        if not parts:
            if m.kind != "dir":
                raise PybuildError(f"archive entry {raw!r} names the root but is not a directory")
            return  # the root's own metadata belongs to the destination, as moby and BuildKit skip it
        self.names.append("/".join(parts))
        if self.overlay:
            if any(p.startswith(".wh..wh.") and p != OPAQUE_MARKER for p in parts):
                return  # AUFS metadata (.wh..wh.plnk and friends), skipped like moby does
            if any(p.startswith(WHITEOUT_PREFIX) for p in parts[:-1]):
                raise PybuildError(f"layer entry {raw!r} is inside a whiteout")
            base = parts[-1]
            if base == OPAQUE_MARKER:
                os.setxattr(self._dirfd(parts[:-1], raw, create=True), OPAQUE_XATTR, b"y")
                return
            if base.startswith(WHITEOUT_PREFIX):
                self._whiteout(parts[:-1], base[len(WHITEOUT_PREFIX):], m)
                return
        if self.chroot:
            parts = self._resolve(parts, raw, follow_leaf=m.kind == "dir")
            if not parts:
                return
        if m.kind == "dir":
            self._directory(parts, m)
            return
        if m.kind == "lnk":
            self._hardlink(parts, m)
            return
        name = parts[-1]
        if m.kind == "reg":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd, _ = self._create(parts, raw, lambda pfd: os.open(name, flags, 0o600, dir_fd=pfd))
            try:
                tar.copy_to(fd, m.size)
                self._fd_meta(fd, m)
                os.utime(fd, ns=(m.mtime_ns, m.mtime_ns))
            finally:
                os.close(fd)
        elif m.kind == "sym":
            _, pfd = self._create(parts, raw, lambda pfd: os.symlink(m.linkname, name, dir_fd=pfd))
            self._path_meta(name, pfd, m, chmod=False)
        elif m.kind in ("chr", "blk"):
            if self.overlay and m.kind == "chr" and m.dev == (0, 0):
                raise PybuildError(
                    f"layer entry {raw!r} is a char device 0:0, which overlay format would read as a whiteout")
            if not self.is_root:
                raise PybuildError(f"archive entry {raw!r} is a device node; creating it needs root")
            kind = stat.S_IFCHR if m.kind == "chr" else stat.S_IFBLK
            _, pfd = self._create(parts, raw, lambda pfd: os.mknod(name, kind | 0o600, os.makedev(*m.dev), dir_fd=pfd))
            self._path_meta(name, pfd, m, chmod=True)
        else:  # fifo
            _, pfd = self._create(parts, raw, lambda pfd: os.mkfifo(name, 0o600, dir_fd=pfd))
            self._path_meta(name, pfd, m, chmod=True)
        self.extracted.add(parts)

    def _create(self, parts: tuple[str, ...], raw: str, make: Callable[[int], T]) -> tuple[T, int]:
        """make(parent_fd) the new node, replacing whatever an earlier entry left at its path."""
        pfd = self._dirfd(parts[:-1], raw, create=True)
        try:
            return make(pfd), pfd
        except FileExistsError:
            self._remove(parts[-1], pfd)
        pfd = self._dirfd(parts[:-1], raw, create=True)  # removing a dir drops the cached fds
        return make(pfd), pfd

    def _owner(self, m: _Member) -> tuple[int, int]:
        return self.chown or (m.uid, m.gid)

    def _whiteout(self, parent: tuple[str, ...], target: str, m: _Member) -> None:
        if target in ("", ".", ".."):
            raise PybuildError(f"layer entry {m.name!r} is not a valid whiteout")
        self._remove(target, self._dirfd(parent, m.name, create=True))
        pfd = self._dirfd(parent, m.name, create=True)
        os.mknod(target, stat.S_IFCHR, 0, dir_fd=pfd)
        if self.is_root:
            os.chown(target, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(target, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self.extracted.discard((*parent, target))

    def _directory(self, parts: tuple[str, ...], m: _Member) -> None:
        pfd = self._dirfd(parts[:-1], m.name, create=True)
        try:
            st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            self._remove(parts[-1], pfd)
            pfd = self._dirfd(parts[:-1], m.name, create=True)
            st = None
        if st is None:
            os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        self._fd_meta(self._dirfd(parts, m.name, create=False), m)
        self.dir_times[parts] = m.mtime_ns  # set at the end: creating children would bump it

    def _hardlink(self, parts: tuple[str, ...], m: _Member) -> None:
        raw = m.name
        target = self._clean(m.linkname, f" (hard link target {m.linkname!r})")
        if not target:
            raise PybuildError(f"archive entry {raw!r} hard-links to the root")
        if self.chroot:
            target = self._resolve(target, raw, follow_leaf=False)
        elif target not in self.extracted:
            raise PybuildError(
                f"layer entry {raw!r} hard-links to {m.linkname!r}, which the layer has not extracted before it")
        if target == parts:
            raise PybuildError(f"archive entry {raw!r} hard-links to itself")
        self._remove(parts[-1], self._dirfd(parts[:-1], raw, create=True))
        tfd = self._dirfd(target[:-1], raw, create=False)
        try:
            tst = os.stat(target[-1], dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            raise PybuildError(f"archive entry {raw!r} hard-links to {m.linkname!r}, which does not exist") from None
        if stat.S_ISDIR(tst.st_mode):
            raise PybuildError(f"archive entry {raw!r} hard-links to directory {m.linkname!r}")
        pfd = self._dirfd(parts[:-1], raw, create=True)
        tfd = self._dirfd(target[:-1], raw, create=False)
        os.link(target[-1], parts[-1], src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.extracted.add(parts)

    def _fd_meta(self, fd: int, m: _Member) -> None:
        # chown first: it clears setuid bits and file capabilities
        if self.is_root:
            os.fchown(fd, *self._owner(m))
        for key, value in m.xattrs:
            os.setxattr(fd, key, value)
        os.fchmod(fd, m.mode)

    def _path_meta(self, name: str, pfd: int, m: _Member, *, chmod: bool) -> None:
        """Metadata for nodes that cannot be opened safely (symlinks, devices, fifos)."""
        if self.is_root:
            os.chown(name, *self._owner(m), dir_fd=pfd, follow_symlinks=False)
        if m.xattrs:
            where = f"/proc/self/fd/{pfd}/{name}"  # no lsetxattrat; the magic link pins the parent
            for key, value in m.xattrs:
                os.setxattr(where, key, value, follow_symlinks=False)
        if chmod:
            os.chmod(name, m.mode, dir_fd=pfd)  # the node was just made here, so following is harmless
        os.utime(name, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def _restore_dir_times(self) -> None:
        for parts in reversed(list(self.dir_times)):
            try:
                pfd = self._dirfd(parts[:-1], "/".join(parts), create=False)
                st = os.stat(parts[-1], dir_fd=pfd, follow_symlinks=False)
            except (PybuildError, FileNotFoundError):
                continue  # replaced by a later entry
            if stat.S_ISDIR(st.st_mode):
                ns = self.dir_times[parts]
                os.utime(parts[-1], ns=(ns, ns), dir_fd=pfd, follow_symlinks=False)


def unpack_layer_tar(stream: BinaryIO, dest: Path) -> LayerInfo:
    """Extract an untrusted (possibly compressed) layer tar into empty `dest` in overlay format.

    `.wh.x` becomes a char device 0:0 named x, `.wh..wh..opq` the opaque xattr on
    its dir. Returns the digest and size of the uncompressed tar, read once.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with os.scandir(dest) as it:
        if next(it, None) is not None:
            raise ValueError(f"{dest} is not empty")
    reader = _DigestReader(stream)
    extractor = _Extractor(dest, overlay=True, chroot=False, chown=None)
    try:
        extractor.run(reader)
    finally:
        extractor.close()
    reader.drain()
    return reader.info()


def unpack_archive_into(stream: BinaryIO, dest_dir: Path, *, chown: tuple[int, int] | None = None) -> list[str]:
    """Unpack a (possibly compressed) tar into a plain directory, as `ADD local.tar /dest` does.

    Like moby's Untar and BuildKit's unpack: `.wh.` entries are ordinary files,
    absolute names land under `dest_dir`, symlinks (also pre-existing ones) are
    resolved inside `dest_dir` and anything climbing out of it is refused.
    `chown` overrides the archive's owners. Returns the entry paths, relative.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    extractor = _Extractor(dest_dir, overlay=False, chroot=True, chown=chown)
    try:
        extractor.run(_DigestReader(stream))
    finally:
        extractor.close()
    return extractor.names
