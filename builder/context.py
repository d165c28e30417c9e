"""The build context: the directory (or stdin tar) that COPY and ADD read from.

Behaves like the context BuildKit receives: a .dockerignore removes paths as
if they did not exist, except that a directory stays when a ``!`` exception
re-includes something inside it.  The Dockerfile and the ignore file are read
by the caller straight from disk, so ignoring them only affects COPY, as in
BuildKit.  Nothing here walks the whole context: only the sources a step names.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import tarsafe

from builder.patterns import (
    IgnoreLine,
    MatchInfo,
    PatternError,
    PatternMatcher,
    check_glob,
    clean,
    dir_name,
    glob_match,
    parse_ignore,
    split_wildcards,
)
from grammar.errors import PybuildError

MAX_SYMLINK_HOPS = 40  # Linux's MAXSYMLINKS


@dataclass(frozen=True)
class SourceMatch:
    """One COPY/ADD source found in the context.

    `path` is the name as the Dockerfile selects it (relative, wildcards
    expanded, ``.`` for the context root); the copy uses its base name.
    `real_path` and `abs_path` are where it really is, with symlinks on the way
    (the last one included) followed.
    """

    path: str
    abs_path: Path
    is_dir: bool
    real_path: str
    context: BuildContext = field(repr=False, compare=False)


@dataclass(frozen=True)
class _Verdict:
    """What the ignore rules say about one path."""

    info: MatchInfo  # per-pattern parent results, handed to the children
    excluded: bool
    sealed: bool  # excluded and no exception can reach inside: skip the subtree


_KEPT = _Verdict((), False, False)


def find_ignore_file(root: Path, dockerfile: str | Path | None = None) -> Path | None:
    """``<Dockerfile>.dockerignore`` beside the Dockerfile, else ``<root>/.dockerignore``."""
    if dockerfile is not None and str(dockerfile) != "-":
        path = Path(dockerfile)
        specific = path.with_name(path.name + ".dockerignore")
        if specific.is_file():
            return specific
    general = root / ".dockerignore"
    return general if general.is_file() else None


def _join(base: str, name: str) -> str:
    return name if base in (".", "") else f"{base}/{name}"


def _scan(path: Path | str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as entries:
        return sorted(entries, key=lambda e: e.name)


@dataclass(frozen=True)
class BuildContext:
    """A context directory plus the ignore rules in force for it."""

    root: Path  # absolute, symlinks resolved
    ignore_file: Path | None = None
    matcher: PatternMatcher = field(default_factory=lambda: PatternMatcher([]), repr=False)
    ignore_lines: tuple[IgnoreLine, ...] = field(default=(), repr=False)
    _dirs: dict[str, _Verdict | None] = field(default_factory=dict, init=False, repr=False, compare=False)

    # ---------------------------------------------------------------- making

    @classmethod
    def from_dir(cls, root: str | Path, dockerfile: str | Path | None = None) -> BuildContext:
        """The context at `root`; `dockerfile` (as given to ``-f``) picks a specific ignore file."""
        try:
            real = Path(root).resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            raise PybuildError(
                f"unable to prepare context: path {str(root)!r} not found; pass an existing directory"
            ) from None
        if not real.is_dir():
            raise PybuildError(
                f"unable to prepare context: {str(root)!r} is not a directory; "
                "pass a directory, or '-' to read a tar from stdin"
            )
        ignore_file = find_ignore_file(real, dockerfile)
        if ignore_file is None:
            return cls(real)
        lines = tuple(parse_ignore(ignore_file.read_bytes()))
        try:
            matcher = PatternMatcher(entry.pattern for entry in lines)
        except PatternError as err:
            entry = lines[err.index] if err.index is not None else None
            raise PybuildError(
                err.message,
                place=f"{ignore_file}:{entry.line}" if entry else str(ignore_file),
                source=entry.pattern if entry else None,
            ) from None
        return cls(real, ignore_file, matcher, lines)

    @classmethod
    def from_tar(cls, stream: BinaryIO, tmpdir: str | Path, dockerfile: str | None = "Dockerfile") -> BuildContext:
        """Unpack a context tar (``pybuild build -``) into `tmpdir`/context and open it.

        The tar may be compressed.  Members with absolute or ``..`` paths, links
        leading outside, devices and entries written through symlinks are refused.
        `dockerfile` is the Dockerfile's path inside the tar, for its ignore file.
        """
        tmp = Path(tmpdir)
        spool = tmp / "context.tar"
        root = tmp / "context"
        root.mkdir(mode=0o700)  # the sender controls modes: keep other users out
        os.chmod(root, 0o700)
        try:
            with open(spool, "wb") as out:  # tarsafe reads the archive twice: no pipes
                shutil.copyfileobj(stream, out, 1 << 20)
            with _ContextTar.open(spool, mode="r:*") as tar:
                members = _checked_members(tar.getmembers())
                tar.extractall(root, members=members)
        except (tarfile.TarError, tarsafe.TarSafeException) as err:
            raise PybuildError(
                f"cannot read the build context from stdin: {err}; "
                "send a tar archive (plain, gzip, bzip2 or xz) of the context directory"
            ) from None
        finally:
            spool.unlink(missing_ok=True)
        df: Path | None = None
        if dockerfile is not None and dockerfile != "-":
            name = clean(dockerfile.lstrip("/"))
            if name == ".." or name.startswith("../"):
                raise PybuildError(f"the Dockerfile path {dockerfile!r} leads outside the build context")
            df = root / name
        return cls.from_dir(root, df)

    # ------------------------------------------------------------ ignore rules

    def _judge(self, rel: str, parent: _Verdict) -> _Verdict:
        if not self.matcher:
            return _KEPT
        try:
            excluded, info = self.matcher.matches_using_parent_results(rel, parent.info)
        except PatternError as err:  # a regex that only fails when first used
            entry = next((e for e in self.ignore_lines if e.pattern.lstrip("!") == err.pattern), None)
            raise PybuildError(
                err.message,
                place=f"{self.ignore_file}:{entry.line}" if entry else str(self.ignore_file),
                source=entry.pattern if entry else None,
            ) from None
        return _Verdict(info, excluded, excluded and not self.matcher.may_reinclude_under(rel))

    def _verdict(self, rel: str) -> _Verdict | None:
        """The rules' verdict on `rel`, or None when an ancestor hides it entirely."""
        if rel == ".":
            return _KEPT
        parent = self._dir_verdict(dir_name(rel))
        if parent is None or parent.sealed:
            return None
        return self._judge(rel, parent)

    def _dir_verdict(self, rel: str) -> _Verdict | None:
        if rel not in self._dirs:
            self._dirs[rel] = self._verdict(rel)
        return self._dirs[rel]

    def _present(self, rel: str, st: os.stat_result) -> bool:
        """Whether `rel` (a real path that exists) is part of the context as sent."""
        verdict = self._verdict(rel)
        if verdict is None:
            return False
        if not verdict.excluded:
            return True
        if stat.S_ISDIR(st.st_mode) and not verdict.sealed:
            return self._reincludes(self.root / rel, rel, verdict)
        return False

    def _reincludes(self, abs_dir: Path | str, rel: str, verdict: _Verdict) -> bool:
        """Whether an excluded directory holds anything an exception brings back."""
        try:
            entries = _scan(abs_dir)
        except PermissionError:
            return False  # excluded anyway; BuildKit skips unreadable excluded dirs too
        for entry in entries:
            child_rel = _join(rel, entry.name)
            child = self._judge(child_rel, verdict)
            if not child.excluded:
                return True
            if not child.sealed and entry.is_dir(follow_symlinks=False):
                if self._reincludes(entry.path, child_rel, child):
                    return True
        return False

    # ------------------------------------------------------------ resolving

    def _not_found(self, instruction: str, src: str) -> PybuildError:
        ignore = self.ignore_file.name if self.ignore_file else ".dockerignore"
        return PybuildError(
            f"{instruction} failed: file not found in build context or excluded by {ignore}: "
            f"stat {src}: file does not exist; check that the path is relative to the "
            f"context root ({self.root}) and that {ignore} does not exclude it"
        )

    def _resolve(self, rel: str, src: str, instruction: str) -> tuple[str, os.stat_result] | None:
        """Follow `rel` inside the context, symlinks included; None if not present.

        Refuses symlinks whose target leaves the context rather than clamping
        them to the root as BuildKit does: a silent clamp copies the wrong file.
        """
        pending = [p for p in reversed(rel.split("/")) if p not in ("", ".")]
        done: list[str] = []
        hops = 0
        link = target = ""
        st = os.lstat(self.root)
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if not done:  # only a symlink target can get here: `rel` is clean
                    raise self._escape(instruction, src, link, target)
                done.pop()
                continue
            path = "/".join(done + [name])
            try:
                st = os.lstat(self.root / path)
            except (FileNotFoundError, NotADirectoryError):
                return None
            except PermissionError:
                raise PybuildError(
                    f"{instruction} failed: cannot read {path} in the build context: permission denied; "
                    "make it readable or exclude it"
                ) from None
            if stat.S_ISLNK(st.st_mode):
                if not self._present(path, st):
                    return None
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise PybuildError(
                        f"{instruction} failed: {src}: too many levels of symbolic links; "
                        "check the symlinks in the build context for a loop"
                    )
                link, target = path, os.readlink(self.root / path)
                if target.startswith("/"):
                    raise self._escape(instruction, src, link, target)
                pending.extend(reversed(target.split("/")))
                continue
            done.append(name)
            if pending and not stat.S_ISDIR(st.st_mode):
                return None  # "not a directory"
        real = "/".join(done) or "."
        if not self._present(real, st):
            return None
        return real, st

    @staticmethod
    def _escape(instruction: str, src: str, link: str, target: str) -> PybuildError:
        return PybuildError(
            f"{instruction} failed: {src}: symlink {link} points outside the build context "
            f"(to {target}); only symlinks that stay inside the context can be followed, "
            "so copy the target into the context or make the link relative to it"
        )

    def _match(self, user_path: str, rel: str, src: str, instruction: str) -> SourceMatch | None:
        found = self._resolve(rel, src, instruction)
        if found is None:
            return None
        real, st = found
        return SourceMatch(user_path, self.root / real if real != "." else self.root,
                           stat.S_ISDIR(st.st_mode), real, self)

    def _glob(self, base_real: str, verdict: _Verdict, pattern: str) -> list[str]:
        """Entries below `base_real` matching `pattern`, as paths relative to it.

        A matching directory is not searched further (BuildKit's SkipDir), and
        the search stops at the deepest level `pattern` could reach.
        """
        depth_limit = pattern.count("/") + pattern.count("[") + 1
        found: list[str] = []

        def visit(abs_dir: Path | str, real: str, rel: str, parent: _Verdict, depth: int) -> None:
            for entry in _scan(abs_dir):
                child_real, child_rel = _join(real, entry.name), _join(rel, entry.name)
                child = self._judge(child_real, parent)
                is_dir = entry.is_dir(follow_symlinks=False)
                if child.excluded and not (
                    is_dir and not child.sealed and self._reincludes(entry.path, child_real, child)
                ):
                    continue
                if glob_match(pattern, child_rel):
                    found.append(child_rel)
                elif is_dir and depth < depth_limit:
                    visit(entry.path, child_real, child_rel, child, depth + 1)

        visit(self.root / base_real if base_real != "." else self.root, base_real, "", verdict, 1)
        return found

    def resolve_sources(
        self, srcs: Iterable[str], *, allow_wildcards: bool = True, instruction: str = "COPY"
    ) -> list[SourceMatch]:
        """The context paths COPY/ADD `srcs` name, wildcards expanded, in order.

        Each source is relative to the context root (a leading ``/`` too).
        Raises PybuildError when a source leaves the context, is missing or
        ignored, or a wildcard matches nothing.
        """
        out: list[SourceMatch] = []
        for src in srcs:
            rel = clean(src.lstrip("/"))
            if rel == ".." or rel.startswith("../"):
                raise PybuildError(
                    f"{instruction} failed: forbidden path outside the build context: {src}; "
                    f"sources are relative to the context root ({self.root}), so move the file "
                    "into the context or build with a wider context"
                )
            base, rest = split_wildcards(rel) if allow_wildcards else (rel, "")
            if not rest:
                match = self._match(rel, rel, src, instruction)
                if match is None:
                    raise self._not_found(instruction, src)
                out.append(match)
                continue
            try:
                check_glob(rest)
            except PatternError as err:
                raise PybuildError(f"{instruction} failed: bad wildcard in source {src!r}: {err.message}") from None
            names: list[str] = []
            base_real = "."
            base_found = self._resolve(base, src, instruction)
            if base_found is not None and stat.S_ISDIR(base_found[1].st_mode):
                base_real = base_found[0]
                verdict = self._verdict(base_real)
                if verdict is not None:
                    names = self._glob(base_real, verdict, rest)
            if not names:
                ignore = self.ignore_file.name if self.ignore_file else ".dockerignore"
                raise PybuildError(
                    f"{instruction} failed: no source files were specified: nothing in the build "
                    f"context matches {src!r}; check the pattern (it is relative to the context "
                    f"root, and '*' does not cross '/') and that {ignore} does not exclude the files"
                )
            for name in names:
                user_path = _join(base, name)
                match = self._match(user_path, _join(base_real, name), src, instruction)
                if match is None:  # a dangling or ignored symlink target
                    raise self._not_found(instruction, user_path)
                out.append(match)
        return out

    # ------------------------------------------------------------ walking

    def walk(self, match: SourceMatch) -> Iterator[tuple[str, os.stat_result]]:
        """Every path of a source, depth first, siblings sorted, ignored ones left out.

        Yields ``(relpath, lstat)`` with relpath relative to the source (``.``
        for the source itself).  Symlinks are reported, never followed.
        """
        st = os.lstat(match.abs_path)
        yield ".", st
        if stat.S_ISDIR(st.st_mode):
            verdict = self._verdict(match.real_path) or _KEPT
            yield from self._walk_dir(match.abs_path, match.real_path, "", verdict)

    def _walk_dir(
        self, abs_dir: Path | str, real: str, rel: str, verdict: _Verdict
    ) -> Iterator[tuple[str, os.stat_result]]:
        try:
            entries = _scan(abs_dir)
        except PermissionError:
            if verdict.excluded:
                return
            raise PybuildError(
                f"cannot read {real} in the build context: permission denied; "
                "make it readable or exclude it in .dockerignore"
            ) from None
        for entry in entries:
            child_real, child_rel = _join(real, entry.name), _join(rel, entry.name)
            st = entry.stat(follow_symlinks=False)
            child = self._judge(child_real, verdict)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not child.excluded:
                yield child_rel, st
                if is_dir:
                    yield from self._walk_dir(entry.path, child_real, child_rel, child)
            elif is_dir and not child.sealed:
                inner = list(self._walk_dir(entry.path, child_real, child_rel, child))
                if inner:  # kept as the parent of something re-included
                    yield child_rel, st
                    yield from inner


def resolve_sources(
    context: BuildContext, srcs: Iterable[str], *, allow_wildcards: bool = True, instruction: str = "COPY"
) -> list[SourceMatch]:
    """`BuildContext.resolve_sources` as a function."""
    return context.resolve_sources(srcs, allow_wildcards=allow_wildcards, instruction=instruction)


def walk(match: SourceMatch) -> Iterator[tuple[str, os.stat_result]]:
    """Walk a source found by `resolve_sources` (see `BuildContext.walk`)."""
    return match.context.walk(match)


# ---------------------------------------------------------------- stdin tars


class _ContextTar(tarsafe.TarSafe):
    """tarsafe, with two corrections for build contexts."""

    extraction_filter = staticmethod(tarfile.fully_trusted_filter)  # modes matter to COPY

    def chown(self, tarinfo: tarfile.TarInfo, targetpath: str, numeric_owner: bool) -> None:
        """Files stay the builder's: COPY sets ownership itself, and foreign uids are a hazard."""

    def _is_unsafe_symlink(self, tarinfo: tarfile.TarInfo, root: str) -> bool:
        # tarsafe resolves a link target against the root; it is relative to the link's directory.
        if not tarinfo.issym():
            return False
        parent = os.path.dirname(os.path.join(root, tarinfo.name))
        resolved = os.path.abspath(os.path.join(parent, tarinfo.linkname))
        return not self._is_contained(root, resolved)


def _refuse(member: tarfile.TarInfo, why: str) -> PybuildError:
    return PybuildError(
        f"refusing the build context from stdin: member {member.name!r} {why}; "
        "build from a tar made of a plain directory (tar -C dir -c .)"
    )


def _member_parts(member: tarfile.TarInfo, name: str) -> list[str]:
    if name.startswith("/"):
        raise _refuse(member, "has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(member, "has '..' in its path")
    return parts


def _checked_members(members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """The members to extract, after refusing anything that could write outside the root."""
    seen: dict[str, tarfile.TarInfo] = {}
    parents: set[str] = set()
    symlinks: set[str] = set()
    out: list[tarfile.TarInfo] = []
    for member in members:
        parts = _member_parts(member, member.name)
        if not parts:
            continue  # the root entry itself
        name = "/".join(parts)
        for n in range(1, len(parts) + 1):
            if "/".join(parts[:n]) in symlinks:
                raise _refuse(member, "would be written through a symlink")
        if member.ischr() or member.isblk():
            raise _refuse(member, "is a device file")
        if member.isfifo():
            raise _refuse(member, "is a named pipe")
        if member.issym():
            if name in seen or name in parents:
                raise _refuse(member, "turns an earlier entry into a symlink")
            if member.linkname.startswith("/"):
                raise _refuse(member, f"is a symlink to an absolute path ({member.linkname})")
            target = clean(_join("/".join(parts[:-1]), member.linkname))
            if target == ".." or target.startswith("../"):
                raise _refuse(member, f"is a symlink leading outside the context ({member.linkname})")
            symlinks.add(name)
        elif member.islnk():
            target_parts = _member_parts(member, member.linkname)
            target = seen.get("/".join(target_parts))
            if target is None or not target.isreg():
                raise _refuse(member, f"is a hard link to {member.linkname!r}, which is not an earlier file")
        elif not (member.isreg() or member.isdir()):
            raise _refuse(member, "has an unsupported type")
        seen[name] = member
        parents.update("/".join(parts[:n]) for n in range(1, len(parts)))
        out.append(member)
    return out
