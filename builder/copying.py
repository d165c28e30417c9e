"""COPY and ADD: where each source lands, with which owner, mode and mtime.

The plan is made in the parent (sources resolved against the build context
and .dockerignore); `apply_copy` runs inside builder.rootfs.in_rootfs on the
merged root, so destination symlinks resolve inside the image and the overlay
records exactly what changed.
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from grammar.errors import PybuildError


@dataclass(frozen=True)
class Source:
    """One COPY/ADD source.

    kind: "context" (host path + entries walked in the parent), "stage"
    (a path inside another stage's root, resolved in the child), "heredoc"
    (inline content), "file" (a downloaded file), "archive" (unpack into dest).
    """

    kind: str
    name: str  # the base name used at the destination
    host_path: str = ""
    is_dir: bool = False
    entries: tuple[str, ...] = ()  # for context dirs: relative paths, parents first
    root: str = ""  # for "stage": which extra root
    pattern: str = ""  # for "stage": the path or wildcard inside that root
    content: bytes = b""
    mode: int | None = None  # heredoc/file default mode
    mtime: int | None = None
    subdir: str = ""  # --parents: the source's own parent path, kept under the destination


@dataclass(frozen=True)
class CopyPlan:
    sources: tuple[Source, ...]
    dest: str  # absolute, as the user meant it (trailing "/" kept)
    dest_is_dir: bool
    owner: tuple[int, int] | None  # --chown result; None: root for context files, kept for stages
    chmod: int | None = None
    excludes: tuple[str, ...] = field(default=())


def apply_copy(root: Path, plan: CopyPlan, **extra_roots: Path) -> int:
    """Place every source under `root`; returns the number of files written."""
    from builder.rootfs import resolve_in_root

    count = 0
    dest_path = resolve_in_root(root, plan.dest)
    dest_is_dir = plan.dest_is_dir or dest_path.is_dir()
    for source in plan.sources:
        if source.subdir:
            count += apply_copy(root, CopyPlan((Source(**{**source.__dict__, "subdir": ""}),),
                                               plan.dest.rstrip("/") + "/" + source.subdir + "/", True,
                                               plan.owner, plan.chmod), **extra_roots)
            continue
        if source.kind == "archive":
            from builder.unpack import unpack_archive_into

            _makedirs(dest_path, plan.owner)
            with open(source.host_path, "rb") as stream:
                count += len(unpack_archive_into(stream, dest_path, chown=plan.owner))
            continue
        if source.kind == "stage":
            count += _copy_from_root(extra_roots[source.root], source, dest_path, dest_is_dir, plan)
            continue
        if source.is_dir:
            _makedirs(dest_path, plan.owner)
            count += _copy_tree(Path(source.host_path), source.entries, dest_path, plan, plan.owner or (0, 0))
            continue
        target = dest_path / source.name if dest_is_dir else dest_path
        _makedirs(target.parent, plan.owner)
        owner = plan.owner or (0, 0)
        if source.kind in ("heredoc", "file"):
            _remove(target)
            target.write_bytes(source.content if source.kind == "heredoc" else Path(source.host_path).read_bytes())
            mode = plan.chmod if plan.chmod is not None else (source.mode if source.mode is not None else 0o644)
            _finish(target, owner, mode, source.mtime)
        else:
            _copy_entry(Path(source.host_path), target, owner, plan.chmod)
        count += 1
    return count


def _copy_from_root(src_root: Path, source: Source, dest_path: Path, dest_is_dir: bool, plan: CopyPlan) -> int:
    from builder.patterns import has_wildcards
    from builder.rootfs import resolve_in_root

    if has_wildcards(source.pattern):
        matches = sorted(glob.glob(str(src_root) + "/" + source.pattern.lstrip("/")))
        if not matches:
            raise PybuildError(f"COPY --from failed: no source files were specified: {source.pattern} matches nothing")
        dest_is_dir = True
        paths = [Path(m) for m in matches]
    else:
        path = resolve_in_root(src_root, source.pattern)
        if not os.path.lexists(path):
            raise PybuildError(f"COPY --from failed: {source.pattern}: not found in the source stage or image")
        paths = [path]
    count = 0
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            _makedirs(dest_path, plan.owner)
            entries = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames.sort()
                rel = os.path.relpath(dirpath, path)
                for name in sorted(dirnames + filenames):
                    entries.append(os.path.normpath(os.path.join(rel, name)))
            count += _copy_tree(path, tuple(entries), dest_path, plan, plan.owner)
        else:
            target = dest_path / path.name if dest_is_dir or len(paths) > 1 else dest_path
            _makedirs(target.parent, plan.owner)
            _copy_entry(path, target, plan.owner, plan.chmod)
            count += 1
    return count


def _copy_tree(src: Path, entries: tuple[str, ...], dest: Path, plan: CopyPlan,
               owner: tuple[int, int] | None) -> int:
    count = 0
    for rel in entries:
        if rel == ".":
            continue
        _copy_entry(src / rel, dest / rel, owner, plan.chmod)
        count += 1
    return count


def _copy_entry(src: Path, target: Path, owner: tuple[int, int] | None, chmod: int | None) -> None:
    st = os.lstat(src)
    uid_gid = owner if owner is not None else (st.st_uid, st.st_gid)
    if stat.S_ISDIR(st.st_mode):
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            _remove(target)
        target.mkdir(exist_ok=True)
        _finish(target, uid_gid, chmod if chmod is not None else stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        return
    _remove(target)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(src), target)
        os.lchown(target, *uid_gid)
        os.utime(target, ns=(st.st_mtime_ns, st.st_mtime_ns), follow_symlinks=False)
        return
    if not stat.S_ISREG(st.st_mode):
        raise PybuildError(f"cannot copy {src.name}: only regular files, directories and symlinks can be copied")
    shutil.copyfile(src, target, follow_symlinks=False)
    _finish(target, uid_gid, chmod if chmod is not None else stat.S_IMODE(st.st_mode), st.st_mtime_ns)


def _finish(path: Path, owner: tuple[int, int], mode: int, mtime_ns: int | None) -> None:
    os.lchown(path, *owner)
    os.chmod(path, mode)  # after chown: chown clears setuid bits
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def _makedirs(path: Path, owner: tuple[int, int] | None) -> None:
    """Create missing directories (0755, owned by --chown's user if given)."""
    missing = []
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise PybuildError(f"cannot create {probe}: a dangling symlink is in the way")
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise PybuildError(f"cannot copy into {path}: a parent is a file, not a directory")
    for item in reversed(missing):
        item.mkdir(mode=0o755)
        os.chmod(item, 0o755)
        if owner is not None:
            os.lchown(item, *owner)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
