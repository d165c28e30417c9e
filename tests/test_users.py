"""USER resolution against passwd/group texts: moby/sys GetExecUser semantics."""
from __future__ import annotations

import pytest

from builder.users import ExecUser, parse_group, parse_passwd, resolve_user
from grammar.errors import PybuildError

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
app:x:1000:1000:app:/home/app:/bin/sh
dup:x:1001:1001::/home/dup1:/bin/sh
dup:x:1002:1002::/home/dup2:/bin/sh
  spaced:x:1003:1003::/home/spaced:/bin/sh

42:x:1004:1004::/home/fortytwo:/bin/sh
nohome:x:1005:1005:::/bin/sh
"""
GROUP = """\
# comment line
root:x:0:
wheel:x:10:root,app
staff:x:50:app
users:x:100:other,app
app:x:1000:
daemon:x:1:
dupgrp:x:60:
dupgrp:x:61:
"""

CASES = [
    # spec, expected (uid, gid, groups, home)
    ("", (0, 0, (10,), "/root")),
    ("root", (0, 0, (10,), "/root")),
    ("0", (0, 0, (10,), "/root")),
    ("app", (1000, 1000, (10, 50, 100), "/home/app")),
    ("1000", (1000, 1000, (10, 50, 100), "/home/app")),
    ("app:staff", (1000, 50, (), "/home/app")),
    ("app:50", (1000, 50, (), "/home/app")),
    ("app:4242", (1000, 4242, (), "/home/app")),  # numeric gid need not exist
    ("1000:1000", (1000, 1000, (), "/home/app")),  # explicit group: no supplementary ones
    ("daemon", (1, 1, (), "/usr/sbin")),
    ("4242", (4242, 0, (), "/")),  # unknown numeric uid: gid 0, home /
    ("4242:staff", (4242, 50, (), "/")),
    ("4242:4343", (4242, 4343, (), "/")),
    ("dup", (1001, 1001, (), "/home/dup1")),  # first match wins
    ("app:dupgrp", (1000, 60, (), "/home/app")),
    ("spaced", (1003, 1003, (), "/home/spaced")),  # lines are trimmed
    ("42", (42, 0, (), "/")),  # a numeric spec is a uid, never a name
    ("+1000", (1000, 1000, (10, 50, 100), "/home/app")),  # as Go's Atoi
    ("nohome", (1005, 1005, (), "/")),
    ("app:staff:extra", None),  # only the first ":" splits: group "staff:extra"
]


@pytest.mark.parametrize(("spec", "want"), CASES)
def test_resolve(spec: str, want: tuple[int, int, tuple[int, ...], str] | None) -> None:
    if want is None:
        with pytest.raises(PybuildError, match="unable to find group staff:extra: no matching entries in group file"):
            resolve_user(spec, PASSWD, GROUP)
        return
    uid, gid, groups, home = want
    assert resolve_user(spec, PASSWD, GROUP) == ExecUser(uid=uid, gid=gid, groups=groups, home=home)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("foo", "unable to find user foo: no matching entries in passwd file"),
        ("foo:0", "unable to find user foo: no matching entries in passwd file"),
        ("app:nogroup", "unable to find group nogroup: no matching entries in group file"),
        ("-1", "uids and gids must be in range 0-2147483647"),
        ("2147483648", "uids and gids must be in range 0-2147483647"),
        ("app:-5", "uids and gids must be in range 0-2147483647"),
    ],
)
def test_errors(spec: str, message: str) -> None:
    with pytest.raises(PybuildError) as info:
        resolve_user(spec, PASSWD, GROUP)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("", ExecUser(0, 0, (), "/")),
        ("1000", ExecUser(1000, 0, (), "/")),
        ("1000:1000", ExecUser(1000, 1000, (), "/")),
    ],
)
def test_no_files(spec: str, want: ExecUser) -> None:
    """A scratch image: numeric ids still work, names do not."""
    assert resolve_user(spec, None, None) == want


def test_no_files_names_fail() -> None:
    with pytest.raises(PybuildError, match="unable to find user app"):
        resolve_user("app", None, None)
    with pytest.raises(PybuildError, match="unable to find group staff"):
        resolve_user("0:staff", PASSWD, None)


def test_parsers_tolerate_junk() -> None:
    """Bad numbers read as 0 and short lines are padded, as moby does."""
    users = parse_passwd("x:x:notanumber:5\n\nshort\n")
    assert [(u.name, u.uid, u.gid, u.home) for u in users] == [("x", 0, 5, ""), ("short", 0, 0, "")]
    groups = parse_group("#c\ng:x:7:a,b\nh:x:8\n")
    assert [(g.name, g.gid, g.members) for g in groups] == [("g", 7, ("a", "b")), ("h", 8, ())]
