"""Layer snapshots: overlay-format directories <-> OCI layer tars.

Layers are kept unpacked in overlayfs format so they stack directly as overlay
lower dirs, and a RUN's upper dir *is* its diff: a deletion is a char device 0:0,
a directory replacing a lower one carries ``trusted.overlay.opaque=y``. This
module turns such a dir into a deterministic OCI layer tar and flattens a stack into
one rootfs tar; builder/tarstream.py reads tars and builder/unpack.py extracts them.

Everything streams: file data moves in 1 MiB chunks through hashlib, so digests
come for free while writing or reading and no layer is read twice.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import BinaryIO, Iterator, TypeVar


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
