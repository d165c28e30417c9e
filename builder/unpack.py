"""Extracting untrusted tars: layers into overlay-format dirs, ADD archives into plain dirs.

Every parent is opened with O_NOFOLLOW from a directory fd down from the root and
files are created with O_EXCL, so no entry can write outside the destination; tarsafe's
checks run beside pybuild's own for links, devices and paths.
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Callable, TypeVar

import tarsafe

from grammar.errors import PybuildError


from builder.snapshot import (_OPEN_DIR, OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX,
                              LayerInfo)
from builder.tarstream import DigestReader, Member, TarReader

T = TypeVar("T")



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

    def run(self, reader: DigestReader) -> None:
        tar = TarReader(reader)
        for m in tar.members():
            try:
                self._entry(tar, m)
            except OSError as e:
                raise PybuildError(f"cannot extract {m.name!r}: {e.strerror or e}") from None
        self._restore_dir_times()

    def _entry(self, tar: TarReader, m: Member) -> None:
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

    def _owner(self, m: Member) -> tuple[int, int]:
        return self.chown or (m.uid, m.gid)

    def _whiteout(self, parent: tuple[str, ...], target: str, m: Member) -> None:
        if target in ("", ".", ".."):
            raise PybuildError(f"layer entry {m.name!r} is not a valid whiteout")
        self._remove(target, self._dirfd(parent, m.name, create=True))
        pfd = self._dirfd(parent, m.name, create=True)
        os.mknod(target, stat.S_IFCHR, 0, dir_fd=pfd)
        if self.is_root:
            os.chown(target, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        os.utime(target, ns=(m.mtime_ns, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self.extracted.discard((*parent, target))

    def _directory(self, parts: tuple[str, ...], m: Member) -> None:
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

    def _hardlink(self, parts: tuple[str, ...], m: Member) -> None:
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

    def _fd_meta(self, fd: int, m: Member) -> None:
        # chown first: it clears setuid bits and file capabilities
        if self.is_root:
            os.fchown(fd, *self._owner(m))
        for key, value in m.xattrs:
            os.setxattr(fd, key, value)
        os.fchmod(fd, m.mode)

    def _path_meta(self, name: str, pfd: int, m: Member, *, chmod: bool) -> None:
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
    reader = DigestReader(stream)
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
        extractor.run(DigestReader(stream))
    finally:
        extractor.close()
    return extractor.names
