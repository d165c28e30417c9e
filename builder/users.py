"""Resolve a Dockerfile USER spec against an image's /etc/passwd and /etc/group.

Pure functions over the files' text, with the semantics of moby/sys `user.GetExecUser`
(what runc applies for docker and BuildKit), so a build runs as the same ids:

* ``name`` / ``uid`` [``:group`` / ``:gid``]; only the first ``:`` splits.
* A numeric part is an id even when no entry has it; a name must have an entry.
* Without an explicit group the gid is the passwd entry's (0 for an unknown
  numeric uid) and the supplementary groups are those whose member list names
  the user; with an explicit group there are none.
* ``""`` means uid 0 (looked up in passwd, for its home and groups).
* HOME is the passwd entry's home, else ``/`` (runc's default).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from grammar.errors import PybuildError

MAX_ID = 2**31 - 1  # moby's limit, for 32-bit compatibility
_NUMERIC = re.compile(r"[+-]?[0-9]+")  # what Go's strconv.Atoi accepts


@dataclass(frozen=True)
class ExecUser:
    """The ids and home a process runs with."""

    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = field(default=())  # supplementary gids, setgroups() order
    home: str = "/"


@dataclass(frozen=True)
class PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


def _atoi(text: str) -> int:
    """Go's ``n, _ = strconv.Atoi(s)``: moby ignores bad numbers in the files (0)."""
    return int(text) if _NUMERIC.fullmatch(text) and abs(int(text)) < 2**63 else 0


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of an /etc/passwd text; blank lines skipped, short lines padded."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        f = line.split(":") + [""] * 7
        out.append(PasswdEntry(f[0], _atoi(f[2]), _atoi(f[3]), f[5]))
    return out


def parse_group(text: str) -> list[GroupEntry]:
    """Entries of an /etc/group text; blank lines and ``#`` comments skipped (as glibc)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        f = line.split(":") + [""] * 4
        out.append(GroupEntry(f[0], _atoi(f[2]), tuple(f[3].split(",")) if f[3] else ()))
    return out


def _numeric(text: str) -> int | None:
    """The id `text` spells, None for a name; out-of-range ids are an error."""
    if not _NUMERIC.fullmatch(text):
        return None
    value = int(text)
    if not 0 <= value <= MAX_ID:
        raise PybuildError(f"uids and gids must be in range 0-{MAX_ID}")
    return value


def resolve_user(spec: str, passwd: str | None, group: str | None) -> ExecUser:
    """The ExecUser for USER `spec`; `passwd`/`group` are the files' text, None if absent.

    Raises PybuildError with docker's wording when a name has no entry.
    """
    user_part, _, group_part = spec.partition(":")
    uid_arg = _numeric(user_part) if user_part else None
    gid_arg = _numeric(group_part) if group_part else None
    uid, gid, home = 0, 0, "/"

    if not user_part:
        matches = [e for e in parse_passwd(passwd or "") if e.uid == uid]
    elif uid_arg is not None:
        matches = [e for e in parse_passwd(passwd or "") if e.uid == uid_arg]
    else:
        matches = [e for e in parse_passwd(passwd or "") if e.name == user_part]

    matched_name = ""
    if matches:  # first match wins
        matched_name = matches[0].name
        uid, gid, home = matches[0].uid, matches[0].gid, matches[0].home
    elif user_part:
        if uid_arg is None:
            raise PybuildError(f"unable to find user {user_part}: no matching entries in passwd file")
        uid = uid_arg

    groups: tuple[int, ...] = ()
    if group_part or matched_name:
        entries = parse_group(group or "")
        if group_part:
            if gid_arg is not None:
                found = [g for g in entries if g.gid == gid_arg]
            else:
                found = [g for g in entries if g.name == group_part]
            if found:
                gid = found[0].gid
            elif gid_arg is None:
                raise PybuildError(f"unable to find group {group_part}: no matching entries in group file")
            else:
                gid = gid_arg
        else:  # supplementary groups only in the implicit form
            groups = tuple(g.gid for g in entries if matched_name in g.members)
    return ExecUser(uid=uid, gid=gid, groups=groups, home=home or "/")
